"""Run a command inside a local podman container by entering its namespaces (molecule harness only).

One home for what both fast paths need: the connection plugin molecule's converges use
(connection_plugins/podman_nsenter.py) and testinfra's podman backend in the verifiers (molecule/conftest.py).
``podman exec`` costs ~250 ms on this 2-core machine and several seconds under load; nsenter(1) ~5 ms.
The command sees the container's namespaces, root and environment (``env -i`` + the container's
``Config.Env``: nothing of the controller's environment leaks in), as root. ADR 0006.
"""

from __future__ import annotations

import json
import subprocess

NAMESPACES = ("--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup")


class ContainerGone(RuntimeError):
    """The container is not running (podman inspect failed or reported no PID)."""


def _start_time(pid: str) -> str | None:
    """Field 22 of /proc/PID/stat: tells a restarted container's new init from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Target:
    """A container's init PID and environment, looked up once and checked (cheaply) before each use."""

    def __init__(self, name: str, podman: str = "podman") -> None:
        self.name, self.podman = name, podman
        self.pid: str | None = None
        self.started: str | None = None
        self.env: list[str] = []

    def refresh(self) -> None:
        fmt = "{{.State.Pid}} {{json .Config.Env}}"
        proc = subprocess.run(
            [self.podman, "inspect", "--type", "container", "--format", fmt, self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        pid, _sep, env = proc.stdout.strip().partition(" ")
        if proc.returncode != 0 or not pid.isdigit() or pid == "0":
            raise ContainerGone(
                f"container {self.name} is not running (podman inspect rc={proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()})"
            )
        self.pid, self.started = pid, _start_time(pid)
        self.env = [e for e in (json.loads(env) if env not in ("", "null") else []) if "=" in e]
        if not any(e.startswith("HOME=") for e in self.env):
            self.env.append("HOME=/root")  # what `podman exec` adds for root

    def argv(self, *command: str) -> list[str]:
        """nsenter argv running COMMAND in the container (re-inspecting if it was restarted)."""
        if self.pid is None or _start_time(self.pid) != self.started:
            self.refresh()
        return [
            "nsenter",
            "--target",
            str(self.pid),
            *NAMESPACES,
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *self.env,
            *command,
        ]
