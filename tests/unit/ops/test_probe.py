"""The host side of sovereign-ops (sovereign_ops/probe.py, sent whole as `python3 -c`): paths and ports come from
the host contract fact; the built-in defaults only where the fact is absent, and the answer says so (issue 10).

The end-to-end cases run the exact command `status`/`history` send, in a local shell, against a real HAProxy (its
admin socket and map file in a tmp dir) and real HTTP servers on ports the fact names, none of them the defaults."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from ports import free_port
from sovereign_ops import cli, fleet, probe

ROOT = Path(__file__).resolve().parents[3]


FACT = {
    "runtime": {
        "config_dir": "/srv/rt",
        "colors": {
            "blue": {"host": "127.0.0.1", "port": 9101, "model_env": "/srv/rt/blue/model.env"},
            "green": {"host": "0.0.0.0", "port": 9102},
        },
    },
    "traffic_switch": {
        "frontend": {"address": "0.0.0.0", "port": 9100},
        "map_file": "/srv/haproxy/colors.map",
        "map_key": "current",
        "admin_socket": "/srv/haproxy/admin.sock",
    },
    "release": {"ledger": "/srv/ledger.jsonl"},
}


@pytest.mark.parametrize(
    ("fact", "expected"),
    [
        pytest.param(
            None,
            dict(
                source="defaults",
                defaulted=["runtime", "traffic_switch", "release"],
                map_file="/etc/haproxy/sovereign/live.map",
                map_key="live",
                admin_socket="/run/haproxy/admin.sock",
                ledger="/var/lib/sovereign/deployments.jsonl",
                frontend_port=8000,
                colors={
                    "blue": {"host": "127.0.0.1", "port": 8001, "model_env": "/etc/sovereign/runtime/blue.model.env"},
                    "green": {"host": "127.0.0.1", "port": 8002, "model_env": "/etc/sovereign/runtime/green.model.env"},
                },
            ),
            id="absent-fact-defaults",
        ),
        pytest.param(
            FACT,
            dict(
                source="fact",
                defaulted=[],
                map_file="/srv/haproxy/colors.map",
                map_key="current",
                admin_socket="/srv/haproxy/admin.sock",
                ledger="/srv/ledger.jsonl",
                frontend_port=9100,
                colors={
                    "blue": {"host": "127.0.0.1", "port": 9101, "model_env": "/srv/rt/blue/model.env"},
                    "green": {"host": "127.0.0.1", "port": 9102, "model_env": "/srv/rt/green.model.env"},
                },
            ),
            id="full-fact-wins",
        ),
        pytest.param(
            {"runtime": FACT["runtime"]},
            dict(source="fact", defaulted=["traffic_switch", "release"], map_file="/etc/haproxy/sovereign/live.map"),
            id="missing-sections-defaulted-and-named",
        ),
        pytest.param(
            {**FACT, "traffic_switch": {"map_file": "/m.map"}, "metrics": {"node": {"port": 9100}}},
            dict(
                defaulted=["traffic_switch.frontend", "traffic_switch.map_key", "traffic_switch.admin_socket"],
                map_file="/m.map",
                map_key="live",
            ),
            id="missing-keys-defaulted-and-named",
        ),
    ],
)
def test_resolve(fact, expected):
    paths = probe.resolve(fact)
    for key, value in expected.items():
        assert paths[key] == value, key


@pytest.mark.parametrize(
    ("contract", "note"),
    [
        (probe.resolve(None), "h: no host contract fact at /etc/ansible/facts.d/sovereign.fact; used the built-in"),
        (probe.resolve({"runtime": FACT["runtime"]}), "h: the host contract fact has no traffic_switch, release; used"),
        (probe.resolve(FACT), None),
    ],
)
def test_contract_note(contract, note):
    got = fleet.contract_note("h", contract)
    assert got == note if note is None else got.startswith(note)


@pytest.mark.parametrize(
    ("fact", "fix"),
    [
        ({k: v for k, v in FACT.items() if k != "release"}, "(the first deploy (playbooks/deploy.yml) publishes it)"),
        ({"runtime": FACT["runtime"], "release": FACT["release"]}, "(playbooks/site.yml publishes it)"),
        ({"runtime": FACT["runtime"]}, "(playbooks/site.yml and the first deploy (playbooks/deploy.yml) publish it)"),
    ],
    ids=["release-missing", "switch-missing", "both-missing"],
)
def test_contract_note_names_the_publisher(fact, fix):
    """The release section appears with a host's first deploy, the others with site.yml: the note says which."""
    assert fleet.contract_note("h", probe.resolve(fact)).endswith(fix)


def test_defaults_are_the_roles_defaults():
    """The fallback is 'what the roles did before the fact existed': it must equal their defaults."""
    runtime = yaml.safe_load((ROOT / "roles/inference_runtime/defaults/main.yml").read_text())
    switch = yaml.safe_load((ROOT / "roles/traffic_switch/defaults/main.yml").read_text())
    release = yaml.safe_load((ROOT / "roles/release/defaults/main.yml").read_text())
    d = probe.DEFAULTS
    assert d["runtime"]["config_dir"] == runtime["inference_runtime_config_dir"]
    assert {c: v["port"] for c, v in d["runtime"]["colors"].items()} == runtime["inference_runtime_ports"]
    assert d["traffic_switch"]["map_file"] == switch["traffic_switch_map_file"]
    assert d["traffic_switch"]["map_key"] == switch["traffic_switch_map_key"]
    assert d["traffic_switch"]["admin_socket"] == switch["traffic_switch_admin_socket"]
    assert d["traffic_switch"]["frontend"]["port"] == switch["traffic_switch_frontend_port"]
    assert d["release"]["ledger"] == release["deploy_ledger_path"]


@pytest.mark.parametrize(
    "fact",
    [
        FACT,
        {"runtime": {"colors": {"blue": {"port": 1}, "green": {"host": "::", "port": 2}}}},
        {"runtime": {"colors": {"blue": {"host": "10.1.1.1", "port": 3}}}},
    ],
    ids=["full", "wildcards", "one-color"],
)
def test_colors_read_as_the_collection_reads_them(fact):
    """The probe and the modules (module_utils/_host_contract.py) find the same host and port for each color."""
    from ansible_collections.sovereign.mlops.plugins.module_utils import _host_contract

    ours = {color: {"host": c["host"], "port": c["port"]} for color, c in probe.resolve(fact)["colors"].items()}
    assert ours == _host_contract.runtime_colors(fact)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"runtime": {"colors": {"blue": {"port": "eighty"}}}}', "has a value of the wrong type"),
    ],
)
def test_broken_fact_is_an_error_not_a_fallback(tmp_path, text, error):
    fact = tmp_path / "sovereign.fact"
    fact.write_text(text)
    proc = run(fleet.status_command(str(fact)))
    row = fleet.parse_status("h", proc.returncode, proc.stdout, proc.stderr)
    assert row["ok"] is False
    assert row["error"].startswith("host contract fact unusable: ") and error in row["error"], row["error"]


def run(command):
    return subprocess.run(["sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


# -- end to end on this machine: a real HAProxy and runtimes on ports only the fact names ----------------------------


class Health(http.server.BaseHTTPRequestHandler):
    ready = True

    def do_GET(self):
        body = b'{"state": "ready"}' if self.ready else b'{"state": "loading", "reason": "weights 40%"}'
        self.send_response(200 if self.ready else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def host(tmp_path):
    """A host laid out by a non-default contract: runtimes on free ports, HAProxy's map and socket in tmp."""
    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (scripts/bootstrap.sh installs it)")
    servers = {}
    for color, ready in (("blue", True), ("green", False)):
        handler = type(f"Health{color}", (Health,), {"ready": ready})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[color] = server
    ports = {color: server.server_address[1] for color, server in servers.items()}
    (tmp_path / "rt" / "blue").mkdir(parents=True)
    (tmp_path / "rt" / "blue" / "model.env").write_text(
        'SOVEREIGN_RUNTIME_MODEL_NAME="churn"\nSOVEREIGN_RUNTIME_MODEL_VERSION=7\n'
        "SOVEREIGN_RUNTIME_MODEL_URI='models:/churn/7'\n"
    )
    (tmp_path / "rt" / "green.model.env").write_text(
        "SOVEREIGN_RUNTIME_MODEL_NAME=churn\nSOVEREIGN_RUNTIME_MODEL_VERSION=8\n"
    )
    map_file, sock = tmp_path / "colors.map", tmp_path / "admin.sock"
    map_file.write_text("# live color\ncurrent blue\n")
    frontend = free_port()
    (tmp_path / "haproxy.cfg").write_text(
        textwrap.dedent(
            f"""
            global
              stats socket {sock} level admin
            defaults
              mode http
              timeout connect 1s
              timeout client 5s
              timeout server 5s
            frontend fe
              bind 127.0.0.1:{frontend}
              use_backend %[str(current),map({map_file})]
              default_backend blue
            backend blue
              server b 127.0.0.1:{ports["blue"]}
            backend green
              server g 127.0.0.1:{ports["green"]}
            """
        )
    )
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert haproxy.poll() is None, haproxy.stderr.read().decode()
        assert time.monotonic() < deadline, "haproxy did not open its admin socket"
        time.sleep(0.05)
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"time": "2026-03-01T12:00:00Z", "action": "deploy", "color": "blue"}) + "\n")
    fact = tmp_path / "sovereign.fact"
    fact.write_text(
        json.dumps(
            {
                "runtime": {
                    "config_dir": str(tmp_path / "rt"),
                    "colors": {
                        "blue": {
                            "host": "127.0.0.1",
                            "port": ports["blue"],
                            "model_env": str(tmp_path / "rt/blue/model.env"),
                        },
                        "green": {"host": "127.0.0.1", "port": ports["green"]},
                    },
                },
                "traffic_switch": {
                    "frontend": {"address": "127.0.0.1", "port": frontend},
                    "map_file": str(map_file),
                    "map_key": "current",
                    "admin_socket": str(sock),
                },
                "release": {"ledger": str(ledger)},
            }
        )
    )
    yield dict(fact=fact, sock=sock, map_file=map_file, ports=ports, ledger=ledger)
    haproxy.terminate()
    haproxy.wait(10)
    for server in servers.values():
        server.shutdown()


def admin(sock, command):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(command.encode() + b"\n")
        return conn.recv(65536).decode()


def test_status_reads_every_path_and_port_from_the_fact(host):
    proc = run(fleet.status_command(str(host["fact"])))
    assert proc.returncode == 0, proc.stderr
    row = fleet.parse_status("h", proc.returncode, proc.stdout)
    assert (row["ok"], row["live"], row["error"], row["note"]) == (True, "blue", None, None), row
    blue, green = row["colors"]["blue"], row["colors"]["green"]
    assert (blue["model"], blue["version"], blue["uri"], blue["ready"]) == ("churn", "7", "models:/churn/7", True)
    assert blue["port"] == host["ports"]["blue"]
    assert (green["version"], green["ready"], green["health"]) == ("8", False, "loading: weights 40%")
    assert "churn v7 (ready)" in fleet.format_status([row])

    # HAProxy's own view comes from the fact's socket: flip it there only, and the row names the disagreement.
    admin(host["sock"], f"set map {host['map_file']} current green")
    row = fleet.parse_status("h", *_rc_out(run(fleet.status_command(str(host["fact"])))))
    assert row["live"] == "green"
    assert row["error"] == "HAProxy routes to green but the map file says blue; live color green is not ready"


def _rc_out(proc):
    return proc.returncode, proc.stdout, proc.stderr


def test_history_reads_the_ledger_the_fact_names(host):
    records, error, note = fleet.ledger_answer("h", *_rc_out(run(fleet.ledger_command(str(host["fact"])))))
    assert (error, note) == (None, None)
    assert [(r["host"], r["action"], r["color"]) for r in records] == [("h", "deploy", "blue")]


def test_absent_fact_falls_back_and_says_so(tmp_path):
    proc = run(fleet.status_command(str(tmp_path / "none.fact")))
    row = fleet.parse_status("h", *_rc_out(proc))
    assert row["contract"]["source"] == "defaults"
    assert row["note"].startswith(f"h: no host contract fact at {tmp_path / 'none.fact'}; used the built-in defaults")


def test_cli_status_and_history_end_to_end(host, tmp_path, monkeypatch, capsys):
    """cli.main as a person runs it: the real ansible-inventory, the probe command the hosts get (here run in a
    local shell in place of SSH), the table and the JSON."""
    inv = tmp_path / "hosts.ini"
    inv.write_text("[inference]\nlocal-01 ansible_host=127.0.0.1\n")

    def local(h, command, timeout=30):
        proc = run(command)
        return proc.returncode, proc.stdout, proc.stderr

    monkeypatch.setattr(cli, "run_on", local)
    assert cli.main(["-i", str(inv), "--fact", str(host["fact"]), "status", "--json"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert (row["host"], row["live"], row["ok"]) == ("local-01", "blue", True)
    assert err == ""
    assert cli.main(["-i", str(inv), "--fact", str(host["fact"]), "history"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["2026-03-01T12:00:00Z", "local-01", "deploy"]
    # Without the fact: today's defaults, and a note on stderr that says so.
    assert cli.main(["-i", str(inv), "--fact", str(tmp_path / "none.fact"), "status"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("sovereign-ops: note: local-01: no host contract fact at ")
    if not os.path.exists(probe.DEFAULTS["traffic_switch"]["map_file"]):
        assert "PROBLEM: no live color (/etc/haproxy/sovereign/live.map: No such file or directory)" in out


def test_probe_runs_on_the_oldest_supported_python():
    """Hosts run Debian's python3; the probe must not use syntax newer than 3.9 (checked by compiling it with
    feature_version)."""
    import ast

    ast.parse(Path(probe.__file__).read_text(), feature_version=(3, 9))


def test_probe_is_self_contained():
    """Nothing of this package exists on the host: the probe imports only the standard library."""
    import ast
    import sys

    tree = ast.parse(Path(probe.__file__).read_text())
    names = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)
    assert os.path.getsize(probe.__file__) < 64 * 1024  # one argv string (MAX_ARG_STRLEN is 128 KiB)
