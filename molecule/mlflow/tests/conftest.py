"""Shared fixtures: where the verifier reaches the MLflow server in the molecule container."""

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import podman_net

INSTANCE = "molecule-mlflow"
PORT = 5000
# The scenario publishes the server's port on the host's loopback (molecule.yml).
PUBLISHED_URL = "http://127.0.0.1:15517"
# TEST VALUES ONLY, the same as converge.yml's; real deployments take them from ansible-vault.
ADMIN_USER = "admin"
ADMIN_PASSWORD = "molecule-test-admin-password"


@pytest.fixture(scope="session")
def container_ip() -> str:
    return podman_net.container_ip(INSTANCE)


@pytest.fixture(scope="session")
def mlflow_url(container_ip) -> str:
    """The server on the container's address on the podman network (its internal address)."""
    return f"http://{container_ip}:{PORT}"


@pytest.fixture(scope="session")
def published_url() -> str:
    return PUBLISHED_URL


@pytest.fixture(scope="session")
def admin_auth() -> tuple[str, str]:
    return (ADMIN_USER, ADMIN_PASSWORD)


@pytest.fixture(scope="session")
def mlflow_credentials(admin_auth):
    """MLflow's client reads basic-auth credentials from these environment variables."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin_auth
    yield admin_auth
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
