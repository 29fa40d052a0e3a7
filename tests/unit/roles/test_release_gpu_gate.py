"""The release role refuses to start a color on a host whose GPU health gate failed (roles/release/tasks/gpu_gate.yml).

The role's task file runs for real (ansible-playbook on localhost, real result files as the health gate writes
them); only the host contract section ``gpu`` is given as roles/nvidia_gpu publishes it. The whole deploy on a GPU
host could not run here (no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "roles" / "release" / "tasks" / "gpu_gate.yml"

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One case
      block:
        - ansible.builtin.include_tasks: {tasks}
          vars:
            color: green
        - ansible.builtin.copy: {{content: "passed", dest: "{{{{ out }}}}/outcome"}}
      rescue:
        - ansible.builtin.copy: {{content: "{{{{ ansible_failed_result.msg }}}}", dest: "{{{{ out }}}}/outcome"}}
"""

FAILED = {
    "status": "fail",
    "passed": False,
    "summary": "GPU 1 (NVIDIA H100 80GB HBM3, 00000000:2A:00.0): XID 79 in this boot's kernel log (reset/reboot class: "
    "GPU has fallen off the bus.); reset the GPU or reboot the host",
}


def run_gate(tmp_path, result=None, reboot_required=False):
    path = tmp_path / "health.json"
    if result is not None:
        path.write_text(json.dumps(result))
    book = tmp_path / "gate.yml"
    book.write_text(PLAYBOOK.format(tasks=TASKS))
    gpu = {"gpu_count": 2, "driver": {"reboot_required": reboot_required},
           "health": {"enabled": True, "result": str(path), "unit": "sovereign-gpu-health.service"}}  # fmt: skip
    extra = {"out": str(tmp_path), "_release_gpu": gpu, "ansible_python_interpreter": sys.executable}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(book), "-e",
         f"@{tmp_path / 'extra.json'}"],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return " ".join((tmp_path / "outcome").read_text().split())


@pytest.mark.parametrize(
    ("result", "reboot", "expected"),
    [
        (dict(status="pass", passed=True, summary="2 GPUs passed"), False, "passed"),
        (FAILED, False, "localhost: green was not started: the GPU health gate failed: GPU 1 (NVIDIA H100 80GB HBM3, "
                        "00000000:2A:00.0): XID 79 in this boot's kernel log"),
        (None, False, "localhost: green was not started: the GPU health gate has no result at"),
        (dict(status="pass", passed=True, summary="2 GPUs passed"), True,
         "localhost: green was not started: the host needs a reboot for its new NVIDIA kernel module"),
    ],
    ids=["passed", "failed", "no result", "reboot required"],
)  # fmt: skip
def test_the_gate_decides_whether_a_color_starts(tmp_path, result, reboot, expected):
    assert run_gate(tmp_path, result, reboot).startswith(expected)
