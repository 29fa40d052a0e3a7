"""sovereign-ops: on-call CLI (status, history, flags, rollback) for the sovereign.mlops inference fleet."""

from __future__ import annotations

import argparse
import concurrent.futures
import getpass
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from . import bus, experiment, fleet, inventory


def connect(host, timeout=10):
    """A Fabric connection with the inventory's settings (imported lazily: the pure parts need no Fabric).

    With a UserKnownHostsFile in the inventory (the lab's), unknown host keys are rejected, as ssh's
    StrictHostKeyChecking=yes does; otherwise Fabric's default applies."""
    import paramiko
    from fabric import Connection

    # paramiko logs a transport thread's failure as a traceback on stderr; the row says it in one line.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    logging.getLogger("paramiko").propagate = False
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


def ssh_error(host, exc):
    """One line naming what went wrong reaching HOST over SSH, and what to check."""
    import paramiko
    from invoke.exceptions import AuthFailure, CommandTimedOut

    where = f"{host.address}:{host.port}"
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host.address}: set ansible_host to a reachable name or address"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return (
            f"unreachable over SSH at {where} (connection refused): is sshd running, ansible_host/ansible_port right?"
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"unreachable over SSH at {where} (no answer in 10 s): check ansible_host/ansible_port and the network"
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"the host key of {where} differs from known_hosts: if the host was rebuilt, replace its entry"
    if isinstance(exc, paramiko.AuthenticationException):
        key = host.key_file or "ssh-agent/default keys"
        user = host.user or getpass.getuser()
        return f"SSH login as {user} on {where} refused (key: {key}): check ansible_user, ansible_ssh_private_key_file"
    if isinstance(exc, paramiko.SSHException) and "protocol banner" in text:
        return f"no SSH server answered at {where} ({text}): check ansible_host/ansible_port"
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in text:
        return (
            f"the host key of {where} is not in {host.known_hosts or 'known_hosts'}: check it, then add it "
            f"(ssh-keyscan -p {host.port} {host.address})"
        )
    if isinstance(exc, AuthFailure):
        return f"sudo on {host.name} asks for a password: allow {host.user} NOPASSWD sudo, or connect as root"
    if isinstance(exc, CommandTimedOut):
        return f"the command on {host.name} ran past {exc.timeout} s: is the host overloaded?"
    if isinstance(exc, FileNotFoundError) and host.key_file:
        return f"the private key {host.key_file} does not exist: fix ansible_ssh_private_key_file"
    if isinstance(exc, OSError):
        return f"unreachable over SSH at {where} ({text}): check ansible_host/ansible_port and the network"
    return f"SSH to {where} failed ({type(exc).__name__}: {text})"


def run_on(host, command, timeout=30):
    """(rc, stdout, stderr) of COMMAND on HOST (sudo when the inventory says ansible_become); a host that cannot
    be reached is rc 255 with a one-line reason, not an exception."""
    try:
        conn = connect(host)
        runner = conn.sudo if host.become else conn.run
        result = runner(command, hide=True, warn=True, timeout=timeout)
        conn.close()
        return result.return_code, result.stdout, result.stderr
    except inventory.InventoryError:
        raise
    except Exception as exc:  # an unreachable host is a row, not a crash
        return 255, "", ssh_error(host, exc)


def on_all(hosts, command, workers=16):
    """{host name: (rc, stdout, stderr)}, in parallel."""

    def one(host):
        return host.name, run_on(host, command)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(hosts) or 1)) as pool:
        return dict(pool.map(one, hosts))


def notes(lines):
    for line in lines:
        if line:
            print(f"sovereign-ops: note: {line}", file=sys.stderr)


def cmd_status(args, hosts):
    results = on_all(hosts, fleet.status_command(args.fact))
    rows = [fleet.parse_status(h.name, *results[h.name]) for h in hosts]
    print(json.dumps(rows, indent=1) if args.json else fleet.format_status(rows))
    notes(row["note"] for row in rows)
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_history(args, hosts):
    results = on_all(hosts, fleet.ledger_command(args.fact))
    ledgers, errors, found = {}, [], []
    for h in hosts:
        ledgers[h.name], error, note = fleet.ledger_answer(h.name, *results[h.name])
        if error:
            errors.append(f"{h.name}: {error}")
        found.append(note)
    records = fleet.merge_history(ledgers, args.number)
    print(json.dumps(records, indent=1) if args.json else fleet.format_history(records))
    notes(found)
    for error in errors:
        print(f"sovereign-ops: warning: could not read the ledger of {error}", file=sys.stderr)
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
    ansible = args.ansible_playbook or inventory.ansible_tool("ansible-playbook")
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


def cmd_infer(args, hosts):
    """One inference over the Zenoh bus, through the inventory's routers (issue 12)."""
    if not args.zenoh:
        print(
            "sovereign-ops: infer goes over the Zenoh bus: give --zenoh (HTTP: curl the :8000 frontend)",
            file=sys.stderr,
        )
        return 2
    eps = bus.endpoints(args.inv)
    user, password = bus.credentials(args.inv, "client", args.vault)
    key = f"{bus.INFER_SPACE}/{args.model}"
    if args.host:
        key += f"/host/{args.host}/{args.color}"
    body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    replies, ms = bus.infer(eps, user, password, key, body, timeout=args.timeout)
    if not replies:
        print(
            f"sovereign-ops: no reply on {key} in {args.timeout} s through {', '.join(eps)}: no live runtime serves "
            f"{args.model} on the bus (sovereign-ops bus lists the queryables), or user {user!r} may not query it",
            file=sys.stderr,
        )
        return 1
    ok, payload = replies[0]
    print(json.dumps(payload, indent=None if args.compact else 1))
    print(
        f"sovereign-ops: {'reply' if ok else 'error reply'} on {key} in {ms:.1f} ms via {', '.join(eps)}",
        file=sys.stderr,
    )
    return 0 if ok else 1


def cmd_bus(args, hosts):
    """The routers, their sessions and the queryables in the inference key space."""
    eps = bus.endpoints(args.inv)
    user, password = bus.credentials(args.inv, "monitor", args.vault)
    data = bus.listing(eps, user, password)
    print(json.dumps(data, indent=1) if args.json else bus.format_listing(data))
    return 0 if data["routers"] else 1


def cmd_rollback(args, hosts):
    cmd = rollback_command(args, hosts)
    names = ", ".join(h.name for h in hosts)
    target = args.to or "each host's previous color"
    if not args.yes and not confirm(f"Roll back {names} to {target}? This moves live traffic. [y/N] "):
        print("aborted; nothing was changed", file=sys.stderr)
        return 1
    vault_argv, fds = args.vault.args()  # the password asked for the inventory is not asked again
    cmd += vault_argv
    print("+ " + " ".join(cmd), file=sys.stderr)
    try:
        return subprocess.call(cmd, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


def cmd_experiment_report(args, hosts):
    """An A/B experiment's report (ops/sovereign_ops/experiment.py): from --dump files, else from every host."""
    dumps, errors = [], []
    if args.dump:
        for path in args.dump:
            doc = json.loads(Path(path).read_text())
            dumps.extend(doc if isinstance(doc, list) else [doc])
    else:
        results = on_all(hosts, experiment.remote_command(args.name, args.fact))
        for h in hosts:
            got, errs = experiment.parse_remote(h.name, *results[h.name])
            dumps.extend(got)
            errors.extend(errs)
    report = experiment.build(
        args.name,
        dumps,
        alpha=args.alpha,
        metric_kind=args.metric_kind,
        higher_is_better=args.higher_is_better,
        min_samples_per_host=args.min_samples_per_host,
    )
    if args.chart:
        why = experiment.chart(report, args.chart)
        notes([why or f"chart written to {args.chart}"])
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if args.json else experiment.format_table(report))
    for error in errors:
        print(f"sovereign-ops: warning: {error}", file=sys.stderr)
    if not any(a["requests"] for a in report["arms"]):
        print(f"sovereign-ops: no records of experiment {args.name!r} were found", file=sys.stderr)
        return 1
    return 1 if errors else 0


def cmd_flags(args, hosts):
    results = on_all(hosts, fleet.flags_command(args.fact))
    rows = [fleet.parse_flags(h.name, *results[h.name]) for h in hosts]
    print(json.dumps(rows, indent=1) if args.json else fleet.format_flags(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="sovereign-ops", description=__doc__)
    default = inventory.default_inventory()
    parser.add_argument(
        "-i",
        "--inventory",
        default=default,
        required=False,  # checked in main(): experiment report --dump needs none
        help="Ansible inventory, as ansible-playbook takes it (default: $SOVEREIGN_OPS_INVENTORY, $ANSIBLE_INVENTORY)",
    )
    parser.add_argument("-g", "--group", default="inference", help="inventory group of the inference hosts")
    parser.add_argument("-l", "--limit", help="comma-separated hosts or groups within the group")
    vault = parser.add_argument_group("vault (passed to ansible-inventory and ansible-playbook)")
    vault.add_argument("--vault-password-file", "--vault-pass-file", action="append", default=[], metavar="FILE")
    vault.add_argument("--vault-id", action="append", default=[], metavar="ID")
    vault.add_argument("-J", "--ask-vault-pass", "--ask-vault-password", action="store_true")
    parser.add_argument("--ansible-inventory", help="ansible-inventory executable (default: this venv's, else PATH)")
    parser.add_argument("--fact", help=argparse.SUPPRESS)  # another contract fact path on the hosts (tests)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="live color, model per color and health of every host (parallel, read-only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("history", help="every host's deployment ledger merged, newest first")
    p.add_argument("-n", "--number", type=int, default=30, help="how many records (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("flags", help="every host's feature flags (flagd file): state, default variant, rollout")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flags)
    p = sub.add_parser("rollback", help="flip each host back to its previous color (runs playbooks/rollback.yml)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--to", choices=["blue", "green"], help="the color to roll back to (default: each host's previous)")
    p.add_argument("--playbook", help="path of rollback.yml (default: found in this checkout, else the collection's)")
    p.add_argument("--ansible-playbook", help="ansible-playbook executable (default: this venv's, else PATH)")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("infer", help="one inference over the Zenoh bus (--zenoh) with the inventory's routers")
    p.add_argument("--zenoh", action="store_true", help="over the Zenoh bus (required)")
    p.add_argument("--model", required=True, help="model name: the key is sovereign/infer/MODEL")
    p.add_argument("--body", default="-", help="OIP infer request JSON file (default: stdin)")
    p.add_argument("--host", help="ask this host's runtime (its host-specific key) instead of the live one")
    p.add_argument("--color", choices=["blue", "green"], default="blue", help="with --host: which color")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--compact", action="store_true", help="the reply on one line")
    p.set_defaults(func=cmd_infer, any_group=True)
    p = sub.add_parser("bus", help="Zenoh routers, their sessions and the queryables in sovereign/infer/**")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bus, any_group=True)
    p = sub.add_parser("experiment", help="A/B experiments (playbooks/experiment.yml)")
    exp = p.add_subparsers(dest="experiment_command", required=True)
    p = exp.add_parser("report", help="per-arm numbers, the difference with its interval and p-value, the verdict")
    p.add_argument("name", help="the experiment's name")
    p.add_argument("--dump", action="append", help="a dump file (JSON) instead of reading the hosts; repeatable")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--chart", help="write a PNG of the per-arm metrics over time here (needs matplotlib)")
    p.add_argument("--alpha", type=float, default=experiment.ALPHA, help="significance level (default 0.05)")
    p.add_argument(
        "--metric-kind",
        choices=[experiment.BINARY, experiment.CONTINUOUS],
        help="default: the definition's, else from the values",
    )
    p.add_argument("--lower-is-better", dest="higher_is_better", action="store_false", default=None)
    p.add_argument(
        "--min-samples-per-host",
        type=int,
        help="requests each host must give each arm (default: the definition's, else "
        f"{experiment.MIN_SAMPLES_PER_HOST}; a host with none never passes)",
    )
    p.set_defaults(func=cmd_experiment_report)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inventory is None and not getattr(args, "dump", None):
        parser.error("the following arguments are required: -i/--inventory")
    args.vault = inventory.Vault(password_files=args.vault_password_file, ids=args.vault_id, ask=args.ask_vault_pass)
    try:
        if getattr(args, "dump", None):  # experiment report --dump: files, no inventory
            return args.func(args, [])
        inv = inventory.load(args.inventory, args.vault, args.ansible_inventory)
        notes(inv.notes)
        args.inv = inv
        # The bus commands read the routers and the credentials, not the inference hosts.
        hosts = [] if getattr(args, "any_group", False) else inventory.select(inv, args.group, args.limit)
        return args.func(args, hosts)
    except inventory.InventoryError as exc:
        print(f"sovereign-ops: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sovereign-ops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line; the traceback only on request
        if os.environ.get("SOVEREIGN_OPS_DEBUG"):
            raise
        print(
            f"sovereign-ops: unexpected error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "run with SOVEREIGN_OPS_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
