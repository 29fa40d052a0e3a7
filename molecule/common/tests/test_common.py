"""Verifies the common role on a real systemd container (testinfra, podman backend)."""

import json

import pytest

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"


@pytest.mark.parametrize(
    ("path", "mode", "group"),
    [
        ("/etc/sovereign", 0o750, "sovereign"),
        ("/var/lib/sovereign", 0o750, "sovereign"),
        ("/opt/sovereign", 0o755, "sovereign"),
        (TEXTFILE_DIR, 0o2775, "sovereign"),
        ("/var/log/journal", 0o2755, "systemd-journal"),
    ],
)
def test_directories(host, path, mode, group):
    d = host.file(path)
    assert d.is_directory
    assert d.user == "root"
    assert d.group == group
    assert d.mode == mode


def test_sovereign_user_is_a_locked_system_user(host):
    user = host.user("sovereign")
    assert user.exists
    assert user.uid < 1000
    assert user.shell == "/usr/sbin/nologin"
    assert user.group == "sovereign"


@pytest.mark.parametrize(
    "package", ["acl", "ca-certificates", "curl", "python3-venv", "systemd-timesyncd", "prometheus-node-exporter"]
)
def test_packages(host, package):
    assert host.package(package).is_installed


def test_node_exporter_runs_hardened(host):
    svc = host.service("prometheus-node-exporter")
    assert svc.is_running
    assert svc.is_enabled
    props = svc.systemd_properties
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["User"] == "prometheus"


def test_node_exporter_listens_on_internal_address_only(host):
    address = host.interface.default().addresses[0]
    assert host.socket(f"tcp://{address}:9100").is_listening
    assert not host.socket("tcp://0.0.0.0:9100").is_listening


def test_contract_publishes_the_internal_address(host):
    """Issue 15: section common names the internal address every role binds its metrics endpoint to."""
    fact = json.loads(host.file("/etc/ansible/facts.d/sovereign.fact").content_string)
    address = host.interface.default().addresses[0]
    assert fact["common"]["internal_address"] == address
    assert fact["metrics"]["node_exporter"]["address"] == address


def test_textfile_collector_exports_metrics(host):
    """A .prom file written into the textfile directory shows up in node_exporter's output."""
    host.run_expect([0], f"printf 'sovereign_verify_probe 42\\n' > {TEXTFILE_DIR}/verify.prom")
    try:
        address = host.interface.default().addresses[0]
        out = host.check_output(f"curl -sf http://{address}:9100/metrics")
        assert "sovereign_verify_probe 42" in out
        assert "node_textfile_scrape_error 0" in out
    finally:
        host.run(f"rm -f {TEXTFILE_DIR}/verify.prom")


def test_journald_is_persistent(host):
    conf = host.file("/etc/systemd/journald.conf.d/sovereign.conf")
    assert conf.contains("^Storage=persistent")
    # journald writes to /var/log/journal/<machine-id> once storage is persistent.
    assert host.run("ls /var/log/journal/*/system.journal").rc == 0


def test_timesyncd_enabled(host):
    assert host.service("systemd-timesyncd").is_enabled
