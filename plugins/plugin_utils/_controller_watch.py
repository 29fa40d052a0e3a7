# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""End a long module's run when the ansible-playbook that started it is gone (controller side only).

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

Ansible's worker processes detach from ansible-playbook (``os.setsid()`` in WorkerProcess): when ansible-playbook
is SIGKILLed (on-call's ``kill -9``, the OOM killer, a CI timeout), a worker that runs a module lives on, blocked on
its connection's process (ssh, local's shell, the molecule harness's nsenter), and holds the pipes to the module.
The module cannot tell that nobody will read its result: its stdout's reader is alive, so is its parent. A
canary analysis then probes the host through its whole hold (minutes in production) and skews what runs next on
it (seen in molecule/progressive, 2026-12-01: 440 foreign requests in the next experiment).

:class:`ControllerWatch` runs in the worker around the module's execution: a thread checks every ``interval``
seconds that the worker still has the parent it started with (a dead parent reparents it). When it is gone, it
ends the worker's child processes (the connection's: ssh closes its session, the remote module's stdout pipe with
it) and exits the worker, which closes the pipes' last reader. The module's own check (canary_analysis's
``controller_gone()``) sees the closed pipe and stops probing. docs/adr/1403-analysis-outlives-no-controller.md.

Apart from the action plugin, importing nothing of Ansible's controller (its unit tests run next to module tests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

CHECK_S = 0.5
EXIT_CODE = 3  # nobody reads it: the ansible-playbook is gone


def child_pids(pid):
    """PIDs of the processes whose parent is PID (Linux's /proc; [] where there is none)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    want = str(pid).encode()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == want:
            found.append(int(entry))
    return found


def end_worker():
    """Terminate this process's children (the connection's processes) and exit at once, writing nothing."""
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    os._exit(EXIT_CODE)  # pylint: disable=protected-access  # from a thread, past Ansible's cleanup: nobody waits


class ControllerWatch:
    """Context manager: while its body runs, ``on_gone()`` (default :func:`end_worker`) is called once this
    process's parent is no longer the one it had when the watch was made."""

    def __init__(self, interval=CHECK_S, on_gone=end_worker, parent=None):
        self.interval = interval
        self.on_gone = on_gone
        self.parent = os.getppid() if parent is None else parent
        self._stop = threading.Event()
        self._thread = None

    def gone(self):
        return os.getppid() != self.parent

    def _watch(self):
        while not self._stop.wait(self.interval):
            if self.gone():
                self.on_gone()
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, name="sovereign-controller-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
