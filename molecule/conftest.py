"""Every scenario's verifier: testinfra reaches the containers through nsenter, not ``podman exec``.

``podman exec`` costs ~250 ms per command here (seconds under load) and a verifier runs hundreds; a
scenario whose inventory says ``ansible_connection: podman_nsenter`` (the molecule base config) would
otherwise fall back to running ``ansible`` once per command. Same container, same namespaces, same
environment: molecule/shared/nsenter.py, ADR 0006.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import testinfra
from testinfra.backend import base
from testinfra.backend.podman import PodmanBackend
from testinfra.utils import ansible_runner

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "shared"))
import nsenter  # pylint: disable=wrong-import-position

_TARGETS: dict[str, nsenter.Target] = {}


def _run(self: PodmanBackend, command: str, *args: str, **kwargs) -> base.CommandResult:
    if self.user not in (None, "root"):
        return _podman_run(self, command, *args, **kwargs)
    cmd = self.get_command(command, *args)
    target = _TARGETS.setdefault(self.name, nsenter.Target(self.name))
    out = self.run_local(shlex.join(target.argv("/bin/sh", "-c", cmd)))
    out.command = self.encode(cmd)
    return out


_get_ansible_host = ansible_runner.get_ansible_host


def _get_ansible_host_nsenter(config, inventory, host, *args, **kwargs):
    hostvars = inventory.get("_meta", {}).get("hostvars", {}).get(host, {})
    if hostvars.get("ansible_connection") == "podman_nsenter":
        return testinfra.get_host(f"podman://{host}")
    return _get_ansible_host(config, inventory, host, *args, **kwargs)


_podman_run = PodmanBackend.run
if os.geteuid() == 0 and shutil.which("nsenter"):
    PodmanBackend.run = _run
    ansible_runner.get_ansible_host = _get_ansible_host_nsenter
