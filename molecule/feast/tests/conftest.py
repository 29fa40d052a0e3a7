"""Shared fixtures: where the verifier reaches Redis and feast serve in the molecule container."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import podman_net
from helpers import INSTANCE, SERVE_PORT


@pytest.fixture(scope="session")
def container_ip() -> str:
    """The container's address on the podman network: its internal address."""
    return podman_net.container_ip(INSTANCE)


@pytest.fixture(scope="session")
def serve_url(container_ip) -> str:
    return f"http://{container_ip}:{SERVE_PORT}"
