# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Action plugin of sovereign.mlops.canary_analysis: the module runs while its ansible-playbook does, not longer.

An analysis holds for minutes, probing the host. When ansible-playbook is SIGKILLed, its worker (this process,
detached from it by Ansible) would wait for the module's whole hold and keep the module's pipes open, so the
module could not tell. ControllerWatch (plugin_utils/_controller_watch.py) ends the worker and its connection
process when ansible-playbook is gone; the module sees its stdout closed and stops within a second.
docs/adr/1403-analysis-outlives-no-controller.md.
"""

from __future__ import annotations

from ansible.plugins.action import ActionBase
from ansible_collections.sovereign.mlops.plugins.plugin_utils._controller_watch import ControllerWatch

MODULE = "sovereign.mlops.canary_analysis"


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        with ControllerWatch():
            result.update(self._execute_module(module_name=MODULE, module_args=self._task.args, task_vars=task_vars))
        return result
