"""sovereign-ops: on-call CLI (status, history, rollback) for the sovereign.mlops inference fleet."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import fleet, inventory


def connect(host, timeout=10):
    """A Fabric connection with the inventory's settings (imported lazily: the pure parts need no Fabric).

    With a UserKnownHostsFile in the inventory (the lab's), unknown host keys are rejected, as ssh's
    StrictHostKeyChecking=yes does; otherwise Fabric's default applies."""
    import paramiko
    from fabric import Connection

    host.check_templates()
    connect_kwargs = {"timeout": timeout}
    if host.key_file:
        connect_kwargs["key_filename"] = os.path.expanduser(str(host.key_file))
    conn = Connection(host=host.address, port=host.port, user=host.user, connect_kwargs=connect_kwargs)
    conn.client.load_system_host_keys()
    if host.known_hosts:
        conn.client.load_host_keys(os.path.expanduser(host.known_hosts))
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return conn


def run_on(host, command, timeout=30):
    """(rc, stdout, stderr) of COMMAND on HOST (sudo when the inventory says ansible_become)."""
    try:
        conn = connect(host)
        runner = conn.sudo if host.become else conn.run
        result = runner(command, hide=True, warn=True, timeout=timeout)
        conn.close()
        return result.return_code, result.stdout, result.stderr
    except inventory.InventoryError:
        raise
    except Exception as exc:  # an unreachable host is a row, not a crash
        return 255, "", f"{type(exc).__name__}: {exc}"


def on_all(hosts, command, workers=16):
    """{host name: (rc, stdout, stderr)}, in parallel."""

    def one(host):
        return host.name, run_on(host, command)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(hosts) or 1)) as pool:
        return dict(pool.map(one, hosts))


def cmd_status(args, hosts):
    results = on_all(hosts, fleet.status_command())
    rows = [fleet.parse_status(h.name, *results[h.name]) for h in hosts]
    print(json.dumps(rows, indent=1) if args.json else fleet.format_status(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_history(args, hosts):
    results = on_all(hosts, f"cat {fleet.LEDGER} 2>/dev/null || true")
    ledgers, errors = {}, []
    for h in hosts:
        rc, out, err = results[h.name]
        if rc != 0:
            errors.append(f"{h.name}: {(err or out).strip()[:200]}")
        ledgers[h.name] = fleet.parse_ledger(h.name, out if rc == 0 else "")
    records = fleet.merge_history(ledgers, args.number)
    print(json.dumps(records, indent=1) if args.json else fleet.format_history(records))
    for error in errors:
        print(f"warning: could not read the ledger of {error}", file=sys.stderr)
    return 1 if errors else 0


def find_playbook(name):
    """playbooks/NAME.yml of this checkout (searched upward from the cwd and from this package), else the
    collection FQCN sovereign.mlops.NAME (ansible-playbook resolves it from an installed collection)."""
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for base in [start, *start.parents]:
            candidate = base / "playbooks" / f"{name}.yml"
            if candidate.is_file() and (base / "galaxy.yml").is_file():
                return str(candidate)
    return f"sovereign.mlops.{name}"


def rollback_command(args, hosts):
    ansible = (
        args.ansible_playbook
        or shutil.which("ansible-playbook")
        or str(Path(sys.executable).with_name("ansible-playbook"))
    )
    cmd = [ansible, "-i", args.inventory, args.playbook or find_playbook("rollback")]
    if args.limit:
        cmd += ["--limit", args.limit]
    if args.group != "inference":
        cmd += ["-e", json.dumps({"deploy_hosts": args.group})]
    if args.to:
        cmd += ["-e", json.dumps({"rollback_to": args.to})]
    return cmd


def confirm(prompt, answer=None):
    if answer is None:
        try:
            answer = input(prompt)
        except EOFError:  # stdin closed (a script, cron, `< /dev/null`): nobody said yes
            print(file=sys.stderr)
            answer = ""
    return answer.strip().lower() in ("y", "yes")


def cmd_rollback(args, hosts):
    cmd = rollback_command(args, hosts)
    names = ", ".join(h.name for h in hosts)
    target = args.to or "each host's previous color"
    if not args.yes and not confirm(f"Roll back {names} to {target}? This moves live traffic. [y/N] "):
        print("aborted; nothing was changed", file=sys.stderr)
        return 1
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def build_parser():
    parser = argparse.ArgumentParser(prog="sovereign-ops", description=__doc__)
    parser.add_argument(
        "-i", "--inventory", default=inventory.default_inventory(), help="Ansible YAML inventory (file or directory)"
    )
    parser.add_argument("-g", "--group", default="inference", help="inventory group of the inference hosts")
    parser.add_argument("-l", "--limit", help="comma-separated hosts or groups within the group")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="live color, model per color and health of every host (parallel, read-only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("history", help="every host's deployment ledger merged, newest first")
    p.add_argument("-n", "--number", type=int, default=30, help="how many records (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("rollback", help="flip each host back to its previous color (runs playbooks/rollback.yml)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--to", choices=["blue", "green"], help="the color to roll back to (default: each host's previous)")
    p.add_argument("--playbook", help="path of rollback.yml (default: found in this checkout, else the collection's)")
    p.add_argument("--ansible-playbook", help="ansible-playbook executable (default: from PATH)")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        hosts = inventory.select(inventory.load(args.inventory), args.group, args.limit)
        return args.func(args, hosts)
    except (inventory.InventoryError, OSError) as exc:
        print(f"sovereign-ops: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
