# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Action plugin of sovereign.mlops.deploy_lock: the lock-liveness decision, on the controller.

The module runs on the lock host, which cannot see the controller's processes; this plugin runs in the
controller's ansible-playbook worker, which can. It (1) records this run's controller, ansible-playbook PID and
start time in the lock it takes, and (2) when the lock is held by a run of this controller whose
ansible-playbook is gone (no such PID, or a PID started at another time: reused), calls the module again with
that holder as ``dead_holder``, which breaks the lock only while info.json still names exactly that holder.
The decision itself is ``holder_liveness()`` (plugin_utils/_lock_liveness.py). docs/adr/0502-deploy-lock-liveness.md.
"""

from __future__ import annotations

import socket

from ansible.plugins.action import ActionBase
from ansible_collections.sovereign.mlops.plugins.plugin_utils._lock_liveness import (
    ALIVE,
    DEAD,
    controller_process,
    holder_liveness,
)

MODULE = "sovereign.mlops.deploy_lock"


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
