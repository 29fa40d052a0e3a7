# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test harness only: molecule's hosts are local podman containers; this reaches them in milliseconds.

containers.podman.podman runs 4-5 ``podman`` processes per task (mount, exec mkdir, exec chmod, exec python,
exec rm: ~250 ms each on this 2-core machine, seconds under load) and cannot pipeline. Entering the
container's namespaces costs ~5 ms, and pipelined a task is one process. Production and the lab use SSH;
docs/adr/0006-molecule-connection-nsenter.md says why the harness may differ.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
name: podman_nsenter
short_description: Run tasks in a local podman container by entering its namespaces (molecule harness)
description:
  - Finds the container's init PID and environment with one C(podman inspect), then runs each command with
    C(nsenter) in the container's namespaces and root, with the container's environment (not the controller's).
    Files are copied through the same namespaces, so symlinks resolve inside the container.
  - Needs root on the controller and a running container on the same machine; runs as root in the container.
author: sovereign.mlops
options:
  podman_executable:
    description: The podman binary used for C(podman inspect).
    default: podman
    vars:
      - name: ansible_podman_executable
  pipelining:
    description: Send modules on standard input (one process per task).
    type: boolean
    default: true
    vars:
      - name: ansible_pipelining
"""

display = Display()

# molecule/shared/nsenter.py: the one home of the nsenter invocation (testinfra's verifiers use it too).
_spec = importlib.util.spec_from_file_location(
    "sovereign_molecule_nsenter", os.path.join(os.path.dirname(os.path.dirname(__file__)), "nsenter.py")
)
nsenter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nsenter)


class Connection(ConnectionBase):
    """nsenter into a local podman container."""

    # Named as podman's own, so that ansible.posix.synchronize (the _common wheelhouse copy) accepts the host: it
    # supports only the transports it knows, and for podman's it runs rsync through `podman exec -i` (the
    # podman_executable option below), as it did before this plugin.
    transport = "podman"
    has_pipelining = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._target = None

    def _connect(self):
        if not self._connected:
            self._target = nsenter.Target(self._play_context.remote_addr, self.get_option("podman_executable"))
            try:
                self._target.refresh()
            except nsenter.ContainerGone as e:
                raise AnsibleConnectionFailure(f"{e}; run `molecule create` first") from e
            self._connected = True
        return self

    def _run(self, argv, **kwargs):
        display.vvv(f"NSENTER {self._target.name}: {argv[-1][:200]}", host=self._target.name)
        try:
            proc = subprocess.run(
                argv, stdout=kwargs.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, check=False, **kwargs
            )
        except OSError as e:
            raise AnsibleConnectionFailure(f"nsenter failed: {e}") from e
        return proc.returncode, proc.stdout or b"", proc.stderr

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        if self._play_context.remote_user not in (None, "", "root"):
            raise AnsibleError("podman_nsenter runs as root only (molecule's hosts); unset remote_user")
        return self._run(self._target.argv("/bin/sh", "-c", to_native(cmd)), input=in_data)

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        self._connect()
        if not os.path.exists(to_bytes(in_path)):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(to_bytes(in_path), "rb") as src:
            rc, _out, err = self._run(self._target.argv("/bin/sh", "-c", 'cat > "$1"', "sh", out_path), stdin=src)
        if rc != 0:
            raise AnsibleError(f"failed to put {in_path} to {out_path}: {to_native(err)}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        self._connect()
        with open(to_bytes(out_path), "wb") as dst:
            rc, _out, err = self._run(self._target.argv("/bin/cat", "--", in_path), stdout=dst)
        if rc != 0:
            raise AnsibleError(f"failed to fetch {in_path} to {out_path}: {to_native(err)}")

    def close(self):
        self._connected = False
