"""Verifies the mlflow role on a real systemd container (testinfra, podman backend)."""

import json

import pytest

ENV_FILE = "/etc/sovereign/mlflow/mlflow.env"
AUTH_INI = "/etc/sovereign/mlflow/basic_auth.ini"
VENV = "/opt/sovereign/mlflow/venv"
VERSION_FILE = "/opt/sovereign/mlflow/db-version"
MLFLOW_VERSION = "3.17.2"


def psql(host, sql, db="postgres"):
    return host.check_output(f'runuser -u postgres -- psql -XAtq -d {db} -c "{sql}"')


@pytest.mark.parametrize("package", ["postgresql", "postgresql-15", "python3-psycopg2"])
def test_packages(host, package):
    assert host.package(package).is_installed


def test_mlflow_user_is_a_locked_system_user(host):
    user = host.user("mlflow")
    assert user.exists
    assert user.uid < 1000
    assert user.shell == "/usr/sbin/nologin"
    assert user.group == "mlflow"
    assert "sovereign" in user.groups


def test_venv_has_the_pinned_mlflow(host):
    out = host.check_output(f"{VENV}/bin/python -c 'import mlflow, psycopg2; print(mlflow.__version__)'")
    assert out.strip() == MLFLOW_VERSION


def test_wheelhouse_holds_the_mlflow_set_only(host):
    assert host.run("ls /opt/sovereign/wheelhouse/mlflow/mlflow-3.17.2-*.whl").rc == 0
    assert host.run("ls /opt/sovereign/wheelhouse/mlflow/torch-*").rc != 0


def test_secret_env_file_is_root_only(host):
    f = host.file(ENV_FILE)
    assert f.is_file
    assert (f.user, f.group, f.mode) == ("root", "root", 0o600)
    assert f.contains("^MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://mlflow:")


def test_auth_config_readable_by_the_service_only(host):
    f = host.file(AUTH_INI)
    assert (f.user, f.group, f.mode) == ("root", "mlflow", 0o640)
    assert f.contains("^database_uri = postgresql+psycopg2://mlflow:.*/mlflow_auth$")
    # The admin password never lands in the ini file: it comes from the 0600 env file.
    assert not f.contains("admin_password")


def test_database_role_is_unprivileged_and_owns_the_databases(host):
    assert psql(host, "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname='mlflow'") == "f|f|f"
    owners = psql(
        host, "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE 'mlflow%' ORDER BY 1"
    )
    assert owners.splitlines() == ["mlflow|mlflow", "mlflow_auth|mlflow"]
    # The schema is MLflow's (alembic-managed) and at the head revision.
    assert psql(host, "SELECT count(*) FROM alembic_version", db="mlflow") == "1"


def test_postgresql_listens_on_loopback_only(host):
    assert host.socket("tcp://127.0.0.1:5432").is_listening
    address = host.interface.default().addresses[0]
    assert not host.socket(f"tcp://{address}:5432").is_listening
    assert not host.socket("tcp://0.0.0.0:5432").is_listening


def test_mlflow_runs_and_listens_on_the_internal_address_only(host):
    svc = host.service("mlflow")
    assert svc.is_running
    assert svc.is_enabled
    address = host.interface.default().addresses[0]
    assert host.socket(f"tcp://{address}:5000").is_listening
    assert not host.socket("tcp://0.0.0.0:5000").is_listening


def test_unit_is_hardened(host):
    props = host.service("mlflow").systemd_properties
    assert props["User"] == "mlflow"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["PrivateDevices"] == "yes"
    assert props["ProtectKernelTunables"] == "yes"
    assert props["ProtectKernelModules"] == "yes"
    assert props["ProtectControlGroups"] == "yes"
    assert props["RestrictSUIDSGID"] == "yes"
    assert props["LockPersonality"] == "yes"
    # An empty bounding set: the server process holds no capability at all.
    assert props.get("CapabilityBoundingSet", "") == ""
    pid = host.check_output("systemctl show -p MainPID --value mlflow")
    assert "CapBnd:\t0000000000000000" in host.file(f"/proc/{pid}/status").content_string
    assert set(props["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert props["ReadWritePaths"] == "/var/lib/sovereign/mlflow"
    assert props["EnvironmentFiles"].startswith(f"{ENV_FILE} ")


def test_unit_exposure_score_is_low(host):
    """systemd's own audit of the sandbox (0 = locked down, 10 = unprotected)."""
    out = host.check_output("systemd-analyze security --no-pager mlflow.service")
    score = float(out.rsplit("Overall exposure level for mlflow.service:", 1)[1].split()[0])
    assert score <= 2.0, out


def test_unit_file_verifies(host):
    host.run_expect([0], "systemd-analyze verify /etc/systemd/system/mlflow.service")


def test_background_job_runner_is_off(host):
    """MLflow's GenAI job runner (7 huey consumers, ~1.3 GB) is off unless asked for."""
    assert host.run("pgrep -u mlflow -f huey_consumer").rc == 1


def test_server_processes_run_as_mlflow(host):
    users = host.check_output("ps -o user= -C python3,mlflow,python | sort -u").split()
    assert users and set(users) == {"mlflow"}


def test_server_command_line_holds_no_password(host):
    cmdlines = host.check_output("ps -o args= -u mlflow")
    assert "psycopg2://" not in cmdlines
    assert "molecule-test" not in cmdlines
    assert "--app-name basic-auth" in cmdlines
    assert "--serve-artifacts" in cmdlines


def test_recorded_database_version(host):
    f = host.file(VERSION_FILE)
    assert f.content_string.strip() == MLFLOW_VERSION
    assert (f.user, f.mode) == ("root", 0o644)


def test_backup_dir_is_private_to_postgres(host):
    d = host.file("/var/backups/sovereign/mlflow")
    assert (d.user, d.group, d.mode) == ("postgres", "postgres", 0o700)


def test_host_contract_publishes_the_metrics_listener(host):
    """Issue 15, docs/adr/1530: with mlflow_prometheus_enabled the contract's endpoint `mlflow` is the
    credential-free sovereign-mlflow-metrics listener on the internal address, while MLflow itself has auth on."""
    fact = json.loads(host.file("/etc/ansible/facts.d/sovereign.fact").content_string)
    assert fact["mlflow"]["auth"] is True
    endpoint = fact["metrics"]["mlflow"]
    assert endpoint["address"] == fact["common"]["internal_address"]
    assert (endpoint["job"], endpoint["port"], endpoint["path"], endpoint["auth"], endpoint["published_by"]) == (
        "mlflow",
        5001,
        "/metrics",
        False,
        "mlflow",
    )
