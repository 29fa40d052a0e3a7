"""sovereign-ops: connection settings from the inventory (read by the real ansible-inventory), status parsing,
ledger merging and the rollback command (no SSH here: molecule/release's test_sovereign_ops_over_ssh runs it over
real SSH; the inventory kinds and errors are in test_inventory.py, the host side in test_probe.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from ports import free_port
from sovereign_ops import cli, fleet, inventory

LAB = textwrap.dedent(
    """
    all:
      vars:
        ansible_user: root
        ansible_host: 127.0.0.1
        ansible_ssh_private_key_file: "/work/main/.lab/ssh/id_ed25519"
        ansible_ssh_common_args: "-o UserKnownHostsFile=/work/main/.lab/ssh/known_hosts -o StrictHostKeyChecking=yes"
      hosts:
        infer-01:
          ansible_port: 2201
        infer-02:
          ansible_port: 2202
        ops-01:
          ansible_port: 2203
      children:
        gpu_hosts:
          hosts:
            infer-01:
            infer-02:
        inference:
          hosts:
            infer-01:
            infer-02:
        mlflow:
          hosts:
            ops-01:
    """
)

NESTED = textwrap.dedent(
    """
    all:
      vars: {ansible_user: deploy, ansible_become: true}
      children:
        site_a:
          vars: {ansible_port: 2222}
          children:
            inference:
              vars: {ansible_user: ml}
              hosts:
                gpu-01.example.internal: {ansible_host: 10.0.0.1}
                gpu-02.example.internal:
                  ansible_port: 22
    """
)


@pytest.fixture
def inv(tmp_path):
    def write(text, name="hosts.yml", group_vars=None, host_vars=None):
        (tmp_path / name).write_text(text)
        for kind, mapping in (("group_vars", group_vars), ("host_vars", host_vars)):
            for key, value in (mapping or {}).items():
                (tmp_path / kind).mkdir(exist_ok=True)
                (tmp_path / kind / f"{key}.yml").write_text(json.dumps(value))
        return tmp_path

    return write


@pytest.mark.parametrize(
    ("text", "extra", "host", "expected"),
    [
        pytest.param(
            LAB,
            {},
            "infer-02",
            dict(
                address="127.0.0.1",
                port=2202,
                user="root",
                key_file="/work/main/.lab/ssh/id_ed25519",
                known_hosts="/work/main/.lab/ssh/known_hosts",
                become=False,
            ),
            id="lab",
        ),
        pytest.param(
            NESTED,
            {},
            "gpu-01.example.internal",
            dict(address="10.0.0.1", port=2222, user="ml", become=True, known_hosts=None),
            id="nested-groups-child-wins",
        ),
        pytest.param(
            NESTED, {}, "gpu-02.example.internal", dict(address="gpu-02.example.internal", port=22), id="host-var-wins"
        ),
        pytest.param(
            NESTED,
            {"group_vars": {"inference": {"ansible_user": "from-group-vars"}}, "host_vars": {}},
            "gpu-01.example.internal",
            dict(user="from-group-vars"),
            id="group-vars-dir",
        ),
        pytest.param(
            NESTED,
            {"host_vars": {"gpu-01.example.internal": {"ansible_port": 9022}}},
            "gpu-01.example.internal",
            dict(port=9022),
            id="host-vars-dir",
        ),
    ],
)
def test_inventory_connection_settings(inv, text, extra, host, expected):
    path = inv(text, **extra)
    hosts = inventory.load(path).hosts
    for attr, value in expected.items():
        assert getattr(hosts[host], attr) == value, attr


@pytest.mark.parametrize(
    ("group", "limit", "names"),
    [
        ("inference", None, ["infer-01", "infer-02"]),
        ("inference", "infer-02", ["infer-02"]),
        ("all", "mlflow", ["ops-01"]),
        ("gpu_hosts", "infer-01,nope", ["infer-01"]),
    ],
)
def test_select(inv, group, limit, names):
    hosts = inventory.load(inv(LAB))
    assert [h.name for h in inventory.select(hosts, group, limit)] == names


@pytest.mark.parametrize(
    ("group", "limit", "message"),
    [
        ("nope", None, "no host in group 'nope' (groups with hosts: gpu_hosts, inference, mlflow)"),
        ("inference", "ops-01", "matches no host"),
    ],
)
def test_select_errors(inv, group, limit, message):
    with pytest.raises(inventory.InventoryError, match=re.escape(message)):
        inventory.select(inventory.load(inv(LAB)), group, limit)


def test_templated_connection_setting_is_refused(inv):
    text = LAB.replace('"/work/main/.lab/ssh/id_ed25519"', '"{{ lab_ssh_key }}"')
    host = inventory.load(inv(text)).hosts["infer-01"]
    with pytest.raises(inventory.InventoryError, match="is a template"):
        host.check_templates()


def _status(live_file="blue", live_haproxy="blue", blue_ready=True, green_ready=True):
    colors = {
        "blue": dict(model="demo", version="1", ready=blue_ready, health="ready" if blue_ready else "down"),
        "green": dict(model="demo", version="2", ready=green_ready, health="ready" if green_ready else "loading"),
    }
    return json.dumps(dict(live_file=live_file, live_haproxy=live_haproxy, colors=colors))


@pytest.mark.parametrize(
    ("rc", "stdout", "stderr", "ok", "live", "error"),
    [
        (0, _status(), "", True, "blue", None),
        (0, _status(green_ready=False), "", True, "blue", None),
        (0, _status(blue_ready=False), "", False, "blue", "live color blue is not ready"),
        (0, _status(live_file="green"), "", False, "blue", "HAProxy routes to blue but the map file says green"),
        (0, _status(live_file=None, live_haproxy=None), "", False, None, "no live color"),
        (0, "noise\n" + _status(live_haproxy=None), "", True, "blue", None),
        (255, "", "NoValidConnectionsError: [Errno 111] Connection refused", False, None, "Connection refused"),
        (0, "not json", "", False, None, "unreadable answer"),
    ],
)
def test_parse_status(rc, stdout, stderr, ok, live, error):
    row = fleet.parse_status("h", rc, stdout, stderr)
    assert row["ok"] is ok
    assert row["live"] == live
    if error:
        assert error in row["error"]
    else:
        assert row["error"] is None
    assert "h" in fleet.format_status([row])


def test_status_command_runs_in_a_shell_without_stdin():
    """The command `status` sends is complete on its own (no stdin) and survives the remote shell's quoting: run
    it in a local shell; this machine has no traffic switch, so no live color."""
    proc = subprocess.run(
        ["sh", "-c", fleet.status_command()], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["hostname"] == socket.gethostname()
    assert set(out["colors"]) == {"blue", "green"}
    row = fleet.parse_status("local", proc.returncode, proc.stdout)
    assert row["live"] is None
    if out["contract"]["source"] == "defaults":  # this machine has no host contract fact: the row says so
        assert row["note"].startswith("local: no host contract fact at /etc/ansible/facts.d/sovereign.fact;")


@pytest.mark.parametrize(
    ("ledgers", "limit", "expected"),
    [
        pytest.param(
            {
                "a": '{"time":"2026-03-01T10:00:00Z","n":1}\n{"time":"2026-03-01T12:00:00Z","n":3}\n',
                "b": '{"time":"2026-03-01T11:00:00Z","n":2}\n',
            },
            None,
            [("a", 3), ("b", 2), ("a", 1)],
            id="interleaved",
        ),
        pytest.param(
            {"a": '{"time":"2026-03-01T10:00:00Z","n":1}\n{"torn', "b": ""},
            None,
            [("a", 1)],
            id="torn-line-and-empty-host",
        ),
        pytest.param(
            {"a": '{"time":"2026-03-01T10:00:00Z","n":1}\n{"time":"2026-03-01T10:00:00Z","n":2}\n'},
            None,
            [("a", 2), ("a", 1)],
            id="same-second-keeps-file-order-reversed",
        ),
        pytest.param(
            {"a": "\n".join(json.dumps({"time": f"2026-03-01T10:00:0{i}Z", "n": i}) for i in range(5))},
            2,
            [("a", 4), ("a", 3)],
            id="limit",
        ),
        pytest.param(
            {"a": '{"time":"2026-03-01T10:00:00Z","n":1,"host":"infer-01.fqdn"}\n'},
            None,
            [("infer-01.fqdn", 1)],
            id="record-host-kept",
        ),
    ],
)
def test_merge_history(ledgers, limit, expected):
    parsed = {host: fleet.parse_ledger(host, text) for host, text in ledgers.items()}
    merged = fleet.merge_history(parsed, limit)
    assert [(r["host"], r["n"]) for r in merged] == expected
    assert fleet.format_history(merged).count("\n") == len(expected)


@pytest.mark.parametrize(
    ("argv", "tail"),
    [
        (["rollback", "--yes"], []),
        (["-l", "infer-02", "rollback", "--yes"], ["--limit", "infer-02"]),
        (["rollback", "--yes", "--to", "blue"], ["-e", '{"rollback_to": "blue"}']),
        (["-g", "gpu_hosts", "rollback", "--yes"], ["-e", '{"deploy_hosts": "gpu_hosts"}']),
    ],
)
def test_rollback_command(inv, argv, tail):
    path = inv(LAB)
    args = cli.build_parser().parse_args(["-i", str(path), *argv, "--ansible-playbook", "/x/ansible-playbook"])
    cmd = cli.rollback_command(args, [])
    assert cmd[:3] == ["/x/ansible-playbook", "-i", str(path)]
    assert cmd[3].endswith("playbooks/rollback.yml") or cmd[3] == "sovereign.mlops.rollback"
    assert cmd[4:] == tail


@pytest.mark.parametrize(("answer", "yes"), [("y", True), ("YES", True), ("", False), ("n", False), ("maybe", False)])
def test_confirm(answer, yes):
    assert cli.confirm("?", answer=answer) is yes


def test_rollback_declined_runs_nothing(inv, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    ran = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: ran.append(cmd) or 0)
    assert cli.main(["-i", str(inv(LAB)), "rollback"]) == 1
    assert ran == []
    assert "nothing was changed" in capsys.readouterr().err


def test_rollback_without_stdin_is_declined(inv, monkeypatch, capsys):
    def closed(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", closed)
    ran = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: ran.append(cmd) or 0)
    assert cli.main(["-i", str(inv(LAB)), "rollback"]) == 1
    assert ran == []
    assert "nothing was changed" in capsys.readouterr().err


def test_rollback_yes_runs_the_playbook(inv, monkeypatch):
    ran = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: ran.append(cmd) or 0)
    assert cli.main(["-i", str(inv(LAB)), "rollback", "--yes"]) == 0
    assert len(ran) == 1
    assert "rollback" in ran[0][3]


def test_unknown_inventory_is_a_clean_error(capsys, tmp_path):
    assert cli.main(["-i", str(tmp_path / "missing.yml"), "status"]) == 2
    assert "sovereign-ops:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "password"),
    [
        pytest.param(["--vault-password-file", "{base}/pw"], "from-file", id="password-file"),
        pytest.param(["--ask-vault-pass"], "typed-once", id="ask-once-then-a-pipe"),
    ],
)
def test_rollback_gives_ansible_playbook_the_vault_password(inv, tmp_path, monkeypatch, argv, password):
    """The vault options reach ansible-playbook; an asked password is asked once (for the inventory) and handed
    to ansible-playbook on a pipe. The stand-in ansible-playbook records the file it was given and reads it."""
    base = inv(LAB)
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setattr(inventory.getpass, "getpass", lambda prompt: "typed-once")
    fake = tmp_path / "ansible-playbook"
    fake.write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --vault-password-file ] && cat "$2" > "$0.got"; shift; done\n'
    )
    fake.chmod(0o755)
    argv = [a.format(base=tmp_path) for a in argv]
    assert cli.main(["-i", str(base), *argv, "rollback", "--yes", "--ansible-playbook", str(fake)]) == 0
    assert (tmp_path / "ansible-playbook.got").read_text().strip() == password


@pytest.fixture
def not_ssh():
    """A TCP server that accepts and hangs up: something listens on the port, but no SSH server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.parametrize(
    ("address", "port", "message"),
    [
        pytest.param(
            "127.0.0.1",
            "free",
            "unreachable over SSH at 127.0.0.1:{port} (connection refused): is sshd running, ansible_host/ansible_port",
            id="connection-refused",
        ),
        pytest.param(
            "127.0.0.1", "not_ssh", "no SSH server answered at 127.0.0.1:{port} (Error reading SSH", id="not-ssh"
        ),
        pytest.param(
            "no-such-host.invalid", 22, "cannot resolve no-such-host.invalid: set ansible_host", id="unresolvable"
        ),
    ],
)
def test_unreachable_host_is_a_one_line_row(request, address, port, message):
    """Real connection attempts (no SSH server needed to fail): the row says what and what to check, on one
    line, and nothing else reaches stderr (paramiko's traceback logging is silenced)."""
    port = free_port() if port == "free" else request.getfixturevalue("not_ssh") if port == "not_ssh" else port
    host = inventory.Host(name="h", vars={"ansible_host": address, "ansible_port": port}, groups={"inference"})
    rc, out, err = cli.run_on(host, fleet.status_command())
    assert rc == 255
    assert "\n" not in err
    assert err.startswith(message.format(port=port)), err
    row = fleet.parse_status("h", rc, out, err)
    assert row["error"] == err


def test_no_traceback_from_paramiko_when_the_cli_runs(tmp_path, not_ssh):
    """As a person runs it (a process of its own, no pytest log capture): paramiko's transport thread logs its
    failure with a traceback unless sovereign-ops silences it; only the row must say it."""
    inv = tmp_path / "hosts.ini"
    inv.write_text(f"[inference]\nh ansible_host=127.0.0.1 ansible_port={not_ssh}\n")
    env = dict(os.environ, PYTHONPATH=str(cli.Path(cli.__file__).parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "sovereign_ops", "-i", str(inv), "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == ""
    assert f"PROBLEM: no SSH server answered at 127.0.0.1:{not_ssh}" in proc.stdout
