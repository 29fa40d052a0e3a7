# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Action plugin of sovereign.mlops.deploy_lock: the lock-liveness decision, on the controller.

The module runs on the lock host, which cannot see the controller's processes; this plugin runs in the
controller's ansible-playbook worker, which can. It (1) records this run's controller, ansible-playbook PID and
start time in the lock it takes, and (2) when the lock is held by a run of this controller whose
ansible-playbook is gone (no such PID, or a PID started at another time: reused), calls the module again with
that holder as ``dead_holder``, which breaks the lock only while info.json still names exactly that holder.
docs/adr/0502-deploy-lock-liveness.md.
"""

from __future__ import annotations

import os
import socket
import subprocess

from ansible.plugins.action import ActionBase

MODULE = "sovereign.mlops.deploy_lock"

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


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        if args.get("state", "present") != "present":
            result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars))
            return result

        controller = args.get("controller") or socket.gethostname()
        args["controller"] = controller
        if args.get("controller_pid") is None:
            args["controller_pid"], args["controller_pid_started"] = controller_process()
        taken = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        held = taken.get("held")
        verdict = holder_liveness(held, controller) if taken.get("failed") and isinstance(held, dict) else None
        if verdict == DEAD and args.get("dead_holder") is None:
            args["dead_holder"] = {k: held.get(k) for k in ("controller", "controller_pid", "since")}
            taken = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        elif verdict == ALIVE:
            taken["msg"] = (
                f"{taken.get('msg', '')} Its ansible-playbook (pid {held.get('controller_pid')}) is still running on "
                f"this controller ({controller})."
            )
        taken["liveness"] = verdict
        result.update(taken)
        return result
