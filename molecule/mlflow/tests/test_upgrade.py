"""The guarded schema upgrade: pretend the database was last upgraded by an older MLflow, run the
upgrade script the role installs, and check it dumped every MLflow database to a restorable file,
upgraded, recorded the version and left the server running. Runs last (file order)."""

import time

import requests

SCRIPT = "/usr/local/sbin/sovereign-mlflow-db-upgrade"
VERSION_FILE = "/opt/sovereign/mlflow/db-version"
BACKUP_DIR = "/var/backups/sovereign/mlflow"
MLFLOW_VERSION = "3.17.2"


def _wait_healthy(url, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise AssertionError(f"{url}/health not OK after {timeout}s")


def test_unchanged_version_is_a_no_op(host):
    before = host.check_output(f"ls {BACKUP_DIR} | wc -l")
    out = host.check_output(SCRIPT)
    assert "nothing to do" in out
    assert host.check_output(f"ls {BACKUP_DIR} | wc -l") == before


def test_version_change_dumps_then_upgrades(host, mlflow_url, admin_auth):
    before = set(host.check_output(f"ls {BACKUP_DIR}").split())
    host.run_expect([0], f"echo 3.16.0 > {VERSION_FILE}")
    result = host.run(SCRIPT)
    assert result.rc == 0, result.stdout + result.stderr
    assert "upgraded the MLflow database to MLflow 3.17.2" in result.stdout

    for db in ("mlflow", "mlflow_auth"):
        dumps = set(host.check_output(f"ls {BACKUP_DIR}").split()) - before
        dump = [d for d in dumps if d.startswith(f"{db}-3.16.0-to-{MLFLOW_VERSION}-") and d.endswith(".dump")]
        assert len(dump) == 1, dumps
        listing = host.check_output(f"runuser -u postgres -- pg_restore --list {BACKUP_DIR}/{dump[0]}")
        table = "experiments" if db == "mlflow" else "users"
        assert f"TABLE public {table} " in listing
    assert host.file(VERSION_FILE).content_string.strip() == MLFLOW_VERSION

    # The script restarted the server it stopped; it serves the data logged before.
    assert host.service("mlflow").is_running
    _wait_healthy(mlflow_url)
    r = requests.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/search", auth=admin_auth, timeout=30)
    assert r.status_code == 200
    assert any(m["name"].startswith("molecule-model-") for m in r.json()["registered_models"])


def test_dump_restores_per_the_runbook(host):
    """The restore commands of docs/runbooks/mlflow-db-upgrade.md, into a scratch database."""
    dump = host.check_output(f"ls -t {BACKUP_DIR}/mlflow-*.dump | head -1")
    scratch = "mlflow_restore_check"
    host.run(f"runuser -u postgres -- dropdb --if-exists {scratch}")
    try:
        host.run_expect(
            [0], f"runuser -u postgres -- createdb --owner=mlflow --template=template0 --encoding=UTF8 {scratch}"
        )
        host.run_expect([0], f"runuser -u postgres -- pg_restore --exit-on-error --dbname={scratch} {dump}")
        query = (
            "SELECT (SELECT count(*) FROM experiments), (SELECT count(*) FROM runs),"
            " (SELECT count(*) FROM registered_models), (SELECT version_num FROM alembic_version)"
        )
        restored = host.check_output(f'runuser -u postgres -- psql -XAtq -d {scratch} -c "{query}"')
        live = host.check_output(f'runuser -u postgres -- psql -XAtq -d mlflow -c "{query}"')
        assert restored == live
        assert int(restored.split("|")[1]) >= 1
    finally:
        host.run(f"runuser -u postgres -- dropdb --if-exists {scratch}")
