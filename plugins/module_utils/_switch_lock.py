# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The per-host switch lock: an ``flock`` that ``blue_green_switch`` holds for a whole switch, so two switches
on one host never interleave.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

The kernel drops an ``flock`` when its holder dies, so a killed run never leaves the lock held. The holder writes
who it is into the lock file (pid, host, time, purpose) so that a waiter that times out can name it. Not to be
confused with the fleet deploy lock (``_fleet_lock``), a directory with a TTL that outlives its holder.
"""

from __future__ import annotations

import os
import socket

from ansible_collections.sovereign.mlops.plugins.module_utils import _files
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import utc_now_iso


class LockTimeout(Exception):
    """The lock stayed held by someone else for the whole wait."""

    def __init__(self, path, timeout, holder):
        self.path = path
        self.timeout = timeout
        self.holder = holder
        super().__init__(
            "could not take the lock {} within {}s: it is held by {}. Another release operation is running on "
            "this host; wait for it, or raise lock_timeout.".format(path, timeout, holder or "an unknown process")
        )


class SwitchLock:
    """``with SwitchLock(path, timeout, purpose):`` exclusive, waits up to ``timeout`` seconds, then raises
    :class:`LockTimeout` naming the holder."""

    def __init__(self, path, timeout=60.0, purpose="", poll=0.1):
        self.purpose = purpose
        self._lock = _files.FileLock(path, timeout=float(timeout), poll=poll)

    @property
    def path(self):
        return self._lock.path

    def _read_holder(self):
        try:
            return (_files.read_text(self.path) or "").strip()
        except OSError:
            return ""

    def acquire(self):
        try:
            self._lock.acquire()
        except _files.LockTimeout:
            raise LockTimeout(self.path, self._lock.timeout, self._read_holder()) from None
        fd = self._lock.fd
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {utc_now_iso()}"
        if self.purpose:
            holder += f" ({self.purpose})"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (holder + "\n").encode("utf-8"))
        os.fsync(fd)
        return self

    def release(self):
        try:
            if self._lock.fd is not None:
                os.ftruncate(self._lock.fd, 0)
        finally:
            self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False
