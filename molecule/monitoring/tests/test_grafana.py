"""The grafana role converged with grafana_install: false on the monitoring host (testinfra, podman backend).

Grafana's server cannot be installed on these machines (no reachable registry carries it), so no grafana-server
runs here: this checks the provisioning files it would read - datasources (the Prometheus URL given, the
Alertmanager URL derived from this host's contract, published by the alertmanager role converged before it),
dashboard provider, every dashboard of the collection - and that the admin password file is private. The
derivation without a monitoring group: tests/unit/roles/test_grafana_preflight.py.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import host_contract

ROOT = pathlib.Path(__file__).resolve().parents[3]
DASHBOARDS = "/var/lib/grafana/dashboards/sovereign"


def _json(host, path):
    return json.loads(host.file(path).content_string)


def test_datasources_name_the_inventory_prometheus_and_alertmanager(host):
    f = host.file("/etc/grafana/provisioning/datasources/sovereign.yaml")
    assert (f.user, f.group, f.mode) == ("root", "root", 0o640)
    sources = {d["uid"]: d for d in _json(host, f.path)["datasources"]}
    assert sources["sovereign-prometheus"]["url"] == "http://monitoring-ops:9090"
    assert sources["sovereign-prometheus"]["isDefault"] is True
    # Not given: the URL the monitoring host's contract publishes (the alertmanager role's section).
    alertmanager = host_contract.read_contract(host)["alertmanager"]["url"]
    assert alertmanager.startswith("http://") and alertmanager.endswith(":9093"), alertmanager
    assert sources["sovereign-alertmanager"]["url"] == alertmanager
    assert sources["sovereign-alertmanager"]["type"] == "alertmanager"


def test_dashboard_provider_reads_the_dashboard_directory(host):
    provider = _json(host, "/etc/grafana/provisioning/dashboards/sovereign.yaml")["providers"][0]
    assert provider["options"]["path"] == DASHBOARDS
    assert provider["allowUiUpdates"] is False


def test_every_dashboard_of_the_collection_is_provisioned(host):
    expected = {p.name for p in ROOT.glob("roles/grafana/files/dashboards/*.json")}
    expected |= {f"{p.parts[-4]}.json" for p in ROOT.glob("roles/*/files/monitoring/dashboard.json")}
    present = set(host.check_output(f"ls {DASHBOARDS}").split())
    assert present == expected
    for name in present:
        assert _json(host, f"{DASHBOARDS}/{name}")["uid"]


def test_the_admin_password_file_is_private(host):
    env = host.file("/etc/grafana/sovereign.env")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
    assert "GF_SECURITY_ADMIN_PASSWORD=molecule-grafana-password" in env.content_string
    assert "GF_AUTH_ANONYMOUS_ENABLED=false" in env.content_string


def test_no_grafana_server_was_installed(host):
    assert not host.package("grafana").is_installed
    assert not host.file("/etc/apt/sources.list.d/grafana.sources").exists
