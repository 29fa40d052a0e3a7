"""Shared fixtures: where the verifier reaches Redis and feast serve in the molecule container."""

import subprocess

import pytest
from helpers import INSTANCE, SERVE_PORT


def _container_ip() -> str:
    out = subprocess.run(
        ["podman", "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", INSTANCE],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out, f"{INSTANCE} has no IP address on a podman network"
    return out[0]


@pytest.fixture(scope="session")
def container_ip() -> str:
    """The container's address on the podman network: its internal address."""
    return _container_ip()


@pytest.fixture(scope="session")
def serve_url(container_ip) -> str:
    return f"http://{container_ip}:{SERVE_PORT}"
