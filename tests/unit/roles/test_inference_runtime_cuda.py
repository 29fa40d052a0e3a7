"""inference_runtime on CUDA, rendered (no GPU here): the unit opens only the NVIDIA nodes CUDA needs, the settings
name the GPUs, the venv pins the CUDA torch build.

The role's own templates and variables (defaults/main.yml, vars/main.yml) are rendered by ansible-playbook on
localhost with a host contract section ``gpu`` as roles/nvidia_gpu publishes it. What could not run here: the
unit on a GPU host (scripts/gpu-proof.sh serves a model on cuda there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "inference_runtime"
GPU_SECTION = {
    "gpu_count": 2,
    "device_nodes": ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0", "/dev/nvidia1"],
    "devices_unit": "sovereign-gpu-devices.service",
}

CASES = {
    "cuda": dict(device="cuda", gpu=GPU_SECTION),
    "auto": dict(device="auto", gpu=GPU_SECTION),
    "cuda_gpu1": dict(device="cuda", gpu=GPU_SECTION, cuda_devices=[1]),
    "cpu_no_gpu": dict(device="cpu"),
    "auto_no_gpu": dict(device="auto"),
    "cpu_on_gpu_host": dict(device="cpu", gpu=GPU_SECTION),
    "variant_cu126": dict(device="auto", variant="cu126"),
    "cpu_12_cores": dict(device="auto", nproc=12),
    "cuda_workers_3": dict(device="cuda", gpu=GPU_SECTION, workers=3),
}

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{defaults}, {vars}]
  vars:
    _inference_runtime_color: blue
    _inference_runtime_torch_version: 2.13.0+cu126
  tasks:
    - ansible.builtin.include_tasks: {tasks}
      loop: "{{{{ cases | dict2items }}}}"
      vars:
        case: "{{{{ item.key }}}}"
        inference_runtime_device: "{{{{ item.value.device }}}}"
        inference_runtime_cuda_devices: "{{{{ item.value.cuda_devices | default([]) }}}}"
        inference_runtime_torch_variant: "{{{{ item.value.variant | default('cpu') }}}}"
        inference_runtime_workers: "{{{{ item.value.workers | default('auto') }}}}"
        ansible_facts: "{{{{ {{'processor_nproc': item.value.nproc}} if item.value.nproc is defined else {{}} }}}}"
        ansible_local:
          sovereign: "{{{{ {{'gpu': item.value.gpu}} if item.value.gpu is defined else {{}} }}}}"
    - ansible.builtin.copy: {{content: "{{{{ results | to_json }}}}", dest: "{{{{ out }}}}/rendered.json"}}
"""
# Rendered on the controller (template lookups, no module run per case): one copy at the end writes them all.
TASKS = """
- ansible.builtin.set_fact:
    results: >-
      {{{{ results | default({{}}) | combine({{case: {{
           'unit': lookup('ansible.builtin.template', '{role}/templates/sovereign-runtime@.service.j2'),
           'env': lookup('ansible.builtin.template', '{role}/templates/runtime.env.j2'),
           'pip': {{'pip': _inference_runtime_pip_packages, 'find_links': _inference_runtime_find_links,
                    'index': _inference_runtime_index_url}}}}}}) }}}}
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Every case of CASES rendered in one ansible-playbook run: {case: (unit, env, pip)}."""
    tmp_path = tmp_path_factory.mktemp("inference-runtime-cuda")
    (tmp_path / "case.yml").write_text(TASKS.format(role=ROLE))
    book = tmp_path / "render.yml"
    book.write_text(
        PLAYBOOK.format(defaults=ROLE / "defaults/main.yml", vars=ROLE / "vars/main.yml", tasks=tmp_path / "case.yml")
    )
    extra = {"out": str(tmp_path), "cases": CASES, "ansible_python_interpreter": sys.executable}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(book), "-e",
         f"@{tmp_path / 'extra.json'}"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "rendered.json").read_text())
    return {case: (r["unit"], r["env"], r["pip"]) for case, r in results.items()}


def device_allow(unit):
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("DeviceAllow=")]


@pytest.mark.parametrize("case", ["cuda", "auto"])
def test_cuda_opens_only_the_nvidia_nodes_of_the_contract(rendered, case):
    unit, env, _pip = rendered[case]
    assert "PrivateDevices=no" in unit and "DevicePolicy=closed" in unit
    assert device_allow(unit) == [f"{node} rw" for node in GPU_SECTION["device_nodes"]]
    assert "After=network-online.target sovereign-gpu-devices.service" in unit
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID\nCUDA_VISIBLE_DEVICES=0,1\n" in env


def test_a_color_limited_to_one_gpu_opens_only_that_gpu(rendered):
    unit, env, _pip = rendered["cuda_gpu1"]
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia1"]
    assert device_allow(unit) == [f"{node} rw" for node in nodes]
    assert "CUDA_VISIBLE_DEVICES=1\n" in env


@pytest.mark.parametrize("case", ["cpu_no_gpu", "auto_no_gpu"])
def test_without_gpus_the_unit_has_private_devices(rendered, case):
    unit, env, _pip = rendered[case]
    assert "PrivateDevices=yes" in unit and "DeviceAllow" not in unit and "DevicePolicy" not in unit
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_cpu_device_stays_private_on_a_gpu_host(rendered):
    unit, _env, _pip = rendered["cpu_on_gpu_host"]
    assert "PrivateDevices=yes" in unit and "DeviceAllow" not in unit


def test_a_cuda_torch_variant_is_pinned_and_found_beside_the_runtime_set(rendered):
    _unit, _env, pip = rendered["variant_cu126"]
    assert pip["pip"] == ["sovereign-runtime[mlflow]", "torch==2.13.0+cu126"]
    assert pip["find_links"] == ["/opt/sovereign/wheelhouse/runtime", "/opt/sovereign/wheelhouse/torch-cu126"]
    assert pip["index"] == ""


def test_the_cpu_variant_is_unchanged(rendered):
    _unit, _env, pip = rendered["auto_no_gpu"]
    assert pip["pip"] == ["sovereign-runtime[mlflow]"]
    assert pip["find_links"] == ["/opt/sovereign/wheelhouse/runtime"]


@pytest.mark.parametrize(
    ("case", "workers"),
    [("cuda", 2), ("auto", 2), ("cuda_gpu1", 1), ("cpu_12_cores", 12), ("cuda_workers_3", 3), ("cpu_no_gpu", 1)],
)
def test_workers_default_to_the_colors_gpus_else_the_cores(rendered, case, workers):
    """--workers (ADR 1710): auto = one per GPU of the color on CUDA, else one per core (no facts here: 1)."""
    unit, env, _pip = rendered[case]
    assert f"\nSOVEREIGN_RUNTIME_WORKERS={workers}\n" in env
    assert "\nKillMode=mixed\n" in unit  # only the supervisor gets SIGTERM; it passes it on once
