"""Where a molecule container sits on its podman network, asked from the controller (its internal address)."""

import subprocess


def container_ip(instance: str) -> str:
    out = subprocess.run(
        ["podman", "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", instance],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out, f"{instance} has no IP address on a podman network"
    return out[0]
