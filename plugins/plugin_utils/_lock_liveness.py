# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet lock's liveness decision, for deploy_lock's action plugin (controller side only).

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

Apart from the action plugin so that it imports nothing of Ansible's controller (its unit tests run in-process
next to module tests, and importing the controller's display changes how modules report warnings).
docs/adr/0502-deploy-lock-liveness.md.
"""

from __future__ import annotations

import os
import subprocess

# holder_liveness() verdicts
ALIVE, DEAD, UNKNOWN, ELSEWHERE = "alive", "dead", "unknown", "elsewhere"


def _ps(pid, field):
    """``ps -o FIELD= -p PID`` with whitespace collapsed; None when there is no such process; raises OSError when
    ps itself cannot run (no procps)."""
    proc = subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return " ".join(proc.stdout.split())


def process_started(pid):
    """Start time of PID as ``ps -o lstart=`` prints it (whitespace collapsed), None when PID does not exist."""
    return _ps(pid, "lstart")


def controller_process(pid=None):
    """(pid, started) of the ansible-playbook process this code runs under: from PID (default: this process, a
    worker forked from ansible-playbook, hence with the same command line) up while the parent has the same
    command line."""
    pid = os.getpid() if pid is None else pid
    args = _ps(pid, "args")
    while True:
        parent = _ps(pid, "ppid")
        if not parent or not parent.isdigit() or int(parent) <= 1 or _ps(int(parent), "args") != args:
            break
        pid = int(parent)
    return pid, process_started(pid) or ""


def holder_liveness(info, controller, started_of=process_started):
    """Is the ansible-playbook that holds the lock ``info`` alive, seen from ``controller``?

    ELSEWHERE: the lock names another controller (or none): this controller cannot tell.
    UNKNOWN: it names this controller but no usable PID, or ps cannot run here.
    DEAD: no process has that PID, or the PID's process started at another time than the lock recorded.
    ALIVE: a process with that PID and start time (or with that PID, when the lock recorded no start time).
    """
    if not info or not controller or str(info.get("controller") or "") != controller:
        return ELSEWHERE
    try:
        pid = int(info.get("controller_pid"))
    except (TypeError, ValueError):
        return UNKNOWN
    if pid <= 1:
        return UNKNOWN
    try:
        started = started_of(pid)
    except OSError:
        return UNKNOWN
    if started is None:
        return DEAD
    recorded = " ".join(str(info.get("controller_pid_started") or "").split())
    if recorded and started != recorded:
        return DEAD
    return ALIVE
