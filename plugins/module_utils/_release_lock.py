# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Per-host exclusive lock (``flock``) for release operations.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

The kernel drops an ``flock`` when its holder dies, so a killed run never leaves the lock held. The
holder writes who it is into the lock file (pid, host, time, purpose) so that a waiter that times out
can name it. The file itself is never removed (removing a flock'd file lets two processes lock two
different inodes).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import time


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


def utc_now_iso():
    """Current UTC time, ISO 8601 with a Z suffix and second precision."""
    # datetime.timezone.utc rather than datetime.UTC: targets may run Python < 3.11.
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
    return now.replace(microsecond=0).isoformat().replace("+00:00", "Z")


class HostLock:
    """``with HostLock(path, timeout, purpose):`` — exclusive, waits up to ``timeout`` seconds."""

    def __init__(self, path, timeout=60.0, purpose="", poll=0.1):
        self.path = path
        self.timeout = float(timeout)
        self.purpose = purpose
        self.poll = poll
        self._fd = None

    def _read_holder(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError:
            return ""

    def acquire(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(self.path, self.timeout, self._read_holder()) from None
                time.sleep(self.poll)
        self._fd = fd
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {utc_now_iso()}"
        if self.purpose:
            holder += f" ({self.purpose})"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (holder + "\n").encode("utf-8"))
        os.fsync(fd)
        return self

    def release(self):
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False
