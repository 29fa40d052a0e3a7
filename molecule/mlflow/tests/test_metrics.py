"""MLflow's metrics for Prometheus (docs/adr/1530), against the real server with basic-auth on.

MLflow's own /metrics answers its admins only: 401 without credentials and 403 for a non-admin user (MLflow's auth
fails closed on a route without a permission validator), so no least-privilege MLflow account can scrape it. The
role serves the same counters with sovereign-mlflow-metrics on the internal address, without credentials; these
tests check both halves, that the listener's series are MLflow's, and that it answers 503 while MLflow is down
(so Prometheus sees the target down, not frozen counters). The checks from the controller reach the container's
address on the podman network, as the monitoring host would.
"""

import time

import requests

LISTENER_PORT = 5001
UNIT = "sovereign-mlflow-metrics"
# TEST VALUES ONLY: a non-admin MLflow user the test creates.
READER = ("molecule-reader", "molecule-reader-password")


def _wait(what, check, timeout=180, every=2.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except requests.RequestException:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)


def _listener(container_ip):
    return f"http://{container_ip}:{LISTENER_PORT}/metrics"


def test_mlflow_own_metrics_answer_admins_only(mlflow_url, admin_auth):
    users = f"{mlflow_url}/api/2.0/mlflow/users"
    if requests.get(f"{users}/get", params={"username": READER[0]}, auth=admin_auth, timeout=30).status_code == 404:
        r = requests.post(
            f"{users}/create", json={"username": READER[0], "password": READER[1]}, auth=admin_auth, timeout=30
        )
        assert r.status_code == 200, r.text
    assert requests.get(f"{mlflow_url}/metrics", timeout=30).status_code == 401
    assert requests.get(f"{mlflow_url}/metrics", auth=READER, timeout=30).status_code == 403
    assert requests.get(f"{mlflow_url}/metrics", auth=admin_auth, timeout=30).status_code == 200


def test_listener_serves_mlflow_counters_without_credentials(container_ip, mlflow_url, admin_auth):
    requests.get(
        f"{mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, auth=admin_auth, timeout=30
    )
    r = requests.get(_listener(container_ip), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    assert 'mlflow_http_request_total{method="GET",status="200"}' in r.text
    assert "mlflow_exporter_info" in r.text
    # Only /metrics.
    assert requests.get(f"http://{container_ip}:{LISTENER_PORT}/", timeout=30).status_code == 404


def test_listener_binds_the_internal_address_only(host, container_ip):
    assert host.socket(f"tcp://{container_ip}:{LISTENER_PORT}").is_listening
    for wildcard in ("0.0.0.0", "::"):
        assert not host.socket(f"tcp://{wildcard}:{LISTENER_PORT}").is_listening
    assert host.run(f"curl -s -o /dev/null --max-time 5 http://127.0.0.1:{LISTENER_PORT}/metrics").rc != 0


def test_listener_unit_is_hardened(host):
    svc = host.service(UNIT)
    assert svc.is_running and svc.is_enabled
    props = svc.systemd_properties
    assert (props["User"], props["NoNewPrivileges"], props["ProtectSystem"]) == ("mlflow", "yes", "strict")
    assert props.get("CapabilityBoundingSet", "") == ""
    out = host.check_output(f"systemd-analyze security --no-pager {UNIT}.service")
    score = float(out.rsplit(f"Overall exposure level for {UNIT}.service:", 1)[1].split()[0])
    assert score <= 2.0, out
    host.run_expect([0], f"systemd-analyze verify /etc/systemd/system/{UNIT}.service")


def test_listener_answers_503_while_mlflow_is_down(host, container_ip, mlflow_url):
    host.run_expect([0], "systemctl stop mlflow")
    try:
        r = requests.get(_listener(container_ip), timeout=30)
        assert r.status_code == 503, r.text
        assert "/health" in r.text
    finally:
        host.run_expect([0], "systemctl start mlflow")
    _wait("MLflow healthy again", lambda: requests.get(f"{mlflow_url}/health", timeout=5).status_code == 200)
    _wait("the listener serving again", lambda: requests.get(_listener(container_ip), timeout=5).status_code == 200)
