"""Verifies the traffic_switch role on a real systemd container (testinfra, podman backend).

The two colors are TEST DOUBLES: tiny Python HTTP servers installed by prepare.yml
(files/test_backend.py, units sovereign-test-backend@blue/green), not sovereign-runtime, which this role
does not install. side_effect.yml has already switched the live color from blue to green with
sovereign.mlops.blue_green_switch and re-run the role; these tests check what must hold afterwards, that
green survives a reload, a restart and a reboot of the container, and that the unit is sandboxed.
The reboot test runs last (it restarts the container from the controller).
"""

import json
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import host_contract

INSTANCE = "molecule-traffic_switch"  # molecule-<scenario>: .config/molecule/config.yml
ADMIN_SOCKET = "/run/haproxy/admin.sock"
MAP_FILE = "/etc/haproxy/sovereign/live.map"
FRONTEND = "http://127.0.0.1:8000"


def internal_address(host):
    """The container's default IPv4 address: the stats listener's default bind (no common role here, so no
    common.internal_address in the contract)."""
    return host.check_output("ip -4 -o route get 1.1.1.1 | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p'")


def stats_url(host):
    return f"http://{internal_address(host)}:8404"


def admin(host, command):
    """One command on HAProxy's admin socket, from inside the container."""
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(5)\n"
        f"s.connect({ADMIN_SOCKET!r})\n"
        "s.sendall(sys.argv[1].encode()+b'\\n')\n"
        "out=b''\n"
        "while True:\n"
        "    d=s.recv(65536)\n"
        "    if not d: break\n"
        "    out+=d\n"
        "sys.stdout.write(out.decode())\n"
    )
    return host.check_output(f"python3 -c {shlex.quote(script)} {shlex.quote(command)}")


def color_of(host, method="GET", path="/v2/health/ready"):
    """The X-Sovereign-Color header and the body of one request through the frontend."""
    data = " -X POST -H 'Content-Type: application/json' -d '{\"inputs\": []}'" if method == "POST" else ""
    out = host.check_output(f"curl -sS -D - --max-time 5{data} {FRONTEND}{path}")
    head, _separator, body = out.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    assert head.startswith("HTTP/1.1 200"), out
    return headers.get("x-sovereign-color"), json.loads(body)


def wait_for(predicate, timeout=30.0, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except AssertionError as exc:  # testinfra's check_output raises AssertionError on rc != 0
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {last!r}")


def server_status(host, color):
    lines = admin(host, "show stat").splitlines()
    header = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == f"be_{color}" and row.get("svname") == color:
            return row["status"]
    return None


def both_up(host):
    return all(server_status(host, c) == "UP" for c in ("blue", "green"))


def test_haproxy_installed_running_enabled(host):
    assert host.package("haproxy").is_installed
    svc = host.service("haproxy")
    assert svc.is_running
    assert svc.is_enabled


def test_config_is_valid(host):
    host.run_expect([0], "haproxy -c -f /etc/haproxy/haproxy.cfg")
    cfg = host.file("/etc/haproxy/haproxy.cfg")
    assert cfg.contains("use_backend be_%\\[var(txn.sovereign_color)\\]")
    assert cfg.contains("str(live),map(/etc/haproxy/sovereign/live.map,blue)")
    assert cfg.contains("req.hdr(X-Sovereign-Key),crc32,mod(100)")
    assert cfg.contains("option idle-close-on-response")


def test_listeners(host):
    assert host.socket("tcp://0.0.0.0:8000").is_listening
    # The Prometheus/stats page is on the internal address only.
    assert host.socket(f"tcp://{internal_address(host)}:8404").is_listening
    assert not host.socket("tcp://0.0.0.0:8404").is_listening
    assert not host.socket("tcp://127.0.0.1:8404").is_listening
    # HAProxy binds the admin socket under a temporary name and renames it, so `ss` does not list it by
    # its path: answering a command is the check.
    assert "Name: HAProxy" in admin(host, "show info")


def test_admin_socket_mode_and_group(host):
    sock = host.file(ADMIN_SOCKET)
    assert sock.is_socket
    assert sock.mode == 0o660
    assert sock.group == "haproxy"


def test_runtime_dir_is_recreated_at_boot(host):
    """Debian's unit has no RuntimeDirectory=; tmpfiles.d recreates /run/haproxy at every boot (the role's
    /etc/tmpfiles.d/haproxy.conf overrides Debian's entry to make root the owner)."""
    assert host.file("/etc/tmpfiles.d/haproxy.conf").contains(r"^d /run/haproxy 2775 root haproxy -$")
    d = host.file("/run/haproxy")
    assert d.is_directory
    assert d.mode == 0o2775
    assert d.user == "root"
    assert d.group == "haproxy"


def test_map_file_holds_green_after_the_switch(host):
    f = host.file(MAP_FILE)
    assert f.content_string == "live green\n"
    assert f.user == "root"
    assert f.group == "haproxy"
    assert f.mode == 0o640


def test_show_map_over_the_admin_socket(host):
    assert admin(host, f"show map {MAP_FILE}").split()[1:] == ["live", "green"]


def test_both_colors_health_checked(host):
    wait_for(lambda: both_up(host))


def test_frontend_answers_from_green(host):
    color, body = color_of(host, "POST", "/v2/models/m/infer")
    assert color == "green"
    assert body["outputs"][0]["data"] == ["green"]


def test_runtime_flip_via_admin_socket(host):
    """`set map` alone moves the next request (no reload); the file is untouched, and restored after."""
    try:
        admin(host, f"set map {MAP_FILE} live blue")
        assert color_of(host)[0] == "blue"
        assert host.file(MAP_FILE).content_string == "live green\n"
    finally:
        admin(host, f"set map {MAP_FILE} live green")
    assert color_of(host)[0] == "green"


def test_prometheus_metrics(host):
    stats = stats_url(host)
    out = host.check_output(f"curl -sf {stats}/metrics")
    assert "haproxy_process_" in out
    assert 'haproxy_server_status{proxy="be_green",server="green"' in out
    host.run_expect([0], f"curl -sf -o /dev/null {stats}/stats")


@pytest.mark.parametrize("path", ["/metrics", "//metrics", "/metrics/", "/%6detrics", "/METRICS?x=1"])
def test_frontend_refuses_metrics(host, path):
    """Issue 15: the public frontend never serves the runtime's /metrics (docs/adr/1501-metrics-exposure.md)."""
    code = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' '{FRONTEND}{path}'")
    assert code == "403", f"{path}: {code}"


def test_unit_is_hardened(host):
    props = host.service("haproxy").systemd_properties
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["PrivateDevices"] == "yes"
    assert props["ProtectKernelTunables"] == "yes"
    assert props["RestrictNamespaces"] == "yes"
    assert "/run/haproxy" in props["ReadWritePaths"].split()
    caps = set(props["CapabilityBoundingSet"].split())
    assert caps == {"cap_kill", "cap_setuid", "cap_setgid", "cap_sys_chroot"}
    assert sorted(props["RestrictAddressFamilies"].split()) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # The pid file and master socket moved out of the read-only /run into /run/haproxy.
    assert host.file("/run/haproxy/haproxy.pid").is_file
    master = host.file("/run/haproxy/master.sock")
    assert master.is_socket
    assert master.mode == 0o600


def test_workers_drop_privileges(host):
    users = host.check_output("ps -o user= -C haproxy").split()
    assert "root" in users  # the master
    assert "haproxy" in users  # the worker(s)


def test_reload_is_hitless_and_keeps_green(host):
    """`systemctl reload` under the sandbox: same master, a new worker, green still live."""
    master = host.check_output("systemctl show --property MainPID --value haproxy")
    old_worker = admin(host, "show info").split("Pid: ", 1)[1].split()[0]
    host.run_expect([0], "systemctl reload haproxy")

    def new_worker():
        pid = admin(host, "show info").split("Pid: ", 1)[1].split()[0]
        return pid != old_worker and pid

    wait_for(new_worker)
    assert host.check_output("systemctl show --property MainPID --value haproxy") == master
    assert host.service("haproxy").is_running
    assert admin(host, f"show map {MAP_FILE}").split()[1:] == ["live", "green"]
    assert color_of(host)[0] == "green"


def test_restart_keeps_green(host):
    host.run_expect([0], "systemctl restart haproxy")
    wait_for(lambda: host.socket("tcp://0.0.0.0:8000").is_listening)
    wait_for(lambda: both_up(host))
    assert color_of(host)[0] == "green"


def test_unhealthy_color_is_marked_down(host):
    """HAProxy's active check on /v2/health/ready takes a failing color out (the module's second gate)."""
    host.run_expect([0], "mkdir -p /run/sovereign-test && touch /run/sovereign-test/blue.down")
    try:
        wait_for(lambda: server_status(host, "blue") == "DOWN")
    finally:
        host.run("rm -f /run/sovereign-test/blue.down")
    wait_for(lambda: server_status(host, "blue") == "UP")


contract = host_contract.read_contract


def test_host_contract_traffic_switch_section(host):
    """What the role published is what the running switch uses: each path, socket and port is checked live."""
    section = contract(host)["traffic_switch"]
    assert section["frontend"] == {"address": "0.0.0.0", "port": 8000, "url": FRONTEND}
    assert section["map_file"] == MAP_FILE
    assert host.file(section["map_file"]).content_string.split() == [section["map_key"], "green"]
    assert section["admin_socket"] == ADMIN_SOCKET
    assert host.file(section["admin_socket"]).is_socket
    assert section["health_path"] == "/v2/health/ready"
    assert section["default_color"] == "blue"
    assert section["stats"] == {"address": internal_address(host), "port": 8404}
    assert host.socket(f"tcp://{internal_address(host)}:{section['stats']['port']}").is_listening


def test_host_contract_backends_are_the_runtimes_ports(host):
    """The backends come from the runtime's section (published by prepare.yml for the test backends), not from
    a second definition: HAProxy's servers, the contract's backends and the runtime's colors agree."""
    data = contract(host)
    backends = data["traffic_switch"]["backends"]
    assert backends == data["runtime"]["colors"]
    cfg = host.file("/etc/haproxy/haproxy.cfg").content_string
    for color, spec in backends.items():
        assert f"server {color} {spec['host']}:{spec['port']} check" in cfg


def test_host_contract_metrics_endpoint_serves_metrics(host):
    endpoint = contract(host)["metrics"]["haproxy"]
    assert endpoint == {
        "job": "haproxy",
        "address": internal_address(host),
        "port": 8404,
        "path": "/metrics",
        "scheme": "http",
        "auth": False,
        "labels": {},
        "published_by": "traffic_switch",
    }
    out = host.check_output(
        f"curl -sf {endpoint['scheme']}://{endpoint['address']}:{endpoint['port']}{endpoint['path']}"
    )
    assert "haproxy_process_" in out


def test_zz_reboot_keeps_green(host):
    """Reboot (restart the container from the controller): /run is fresh, haproxy comes back on green."""
    subprocess.run(["podman", "restart", "--time", "20", INSTANCE], check=True, capture_output=True)
    wait_for(lambda: host.run("systemctl is-active haproxy").stdout.strip() == "active", timeout=60)
    wait_for(lambda: host.file(ADMIN_SOCKET).is_socket, timeout=30)
    sock = host.file(ADMIN_SOCKET)
    assert sock.mode == 0o660
    assert sock.group == "haproxy"
    wait_for(lambda: both_up(host), timeout=60)
    assert color_of(host)[0] == "green"


@pytest.fixture(autouse=True, scope="module")
def _frontend_up(host):
    wait_for(lambda: host.socket("tcp://0.0.0.0:8000").is_listening)
