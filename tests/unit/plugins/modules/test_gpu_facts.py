# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""gpu_facts run in-process against recorded hosts (gpu_fixtures/, see its README.md).

Each host's sysfs/procfs tree is written under tmp_path and the module reads it through ``root``; nvidia-smi
and lspci are real executables that replay the recorded output for exactly the arguments recorded (anything
else exits 99). NVML is the one double: there is no GPU on the machines these tests run on, so ``pynvml`` is
a stand-in (gpu_fixtures/harness.py FakeNVML) put into ``sys.modules``, answering with the same recorded
values; ``test_fake_nvml_matches_real_pynvml`` holds it to the real nvidia-ml-py's names and codes. What
could not run here: the module against a real NVIDIA driver and GPU.
Every host runs twice: NVML first (the default) and nvidia-smi only (``use_nvml: false``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.modules import gpu_facts
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.gpu_fixtures import harness
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

P4 = dict(
    index=0,
    bus_id="0000:3b:00.0",
    name="Tesla P4",
    uuid="GPU-5b3a0a4e-8f7c-6d21-9e0b-3c4d5e6f7a81",
    state="ok",
    kernel_driver="nvidia",
    pci_device_id="0x1bb3",
    memory_total_mib=7680,
    compute_capability="6.1",
    architecture="Pascal",
    persistence_mode=True,
    ecc_mode=True,
    ecc_mode_pending=True,
    ecc_errors_corrected_volatile=0,
    ecc_errors_uncorrected_volatile=0,
    temperature_c=36,
    power_limit_w=75.0,
)
RTX4090 = dict(
    index=0,
    bus_id="0000:01:00.0",
    name="NVIDIA GeForce RTX 4090",
    uuid="GPU-e3b1f0c2-7a4d-4c1e-9f2b-5d6a8c0e1f34",
    state="ok",
    kernel_driver="nvidia",
    pci_device_id="0x2684",
    memory_total_mib=24564,
    compute_capability="8.9",
    architecture="Ada Lovelace",
    persistence_mode=False,
    ecc_mode=None,
    ecc_mode_pending=None,
    ecc_errors_corrected_volatile=None,
    ecc_errors_uncorrected_volatile=None,
    temperature_c=38,
    power_limit_w=450.0,
)
H200 = dict(
    index=0,
    bus_id="0000:18:00.0",
    name="NVIDIA H200",
    uuid="GPU-8c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
    state="ok",
    pci_device_id="0x2335",
    memory_total_mib=143771,
    compute_capability="9.0",
    architecture="Hopper",
    ecc_mode=True,
    power_limit_w=700.0,
)
H100_0 = dict(
    index=0,
    bus_id="0000:18:00.0",
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-2f9a6c1e-0b3d-4e5f-8a7b-9c0d1e2f3a4b",
    state="ok",
    memory_total_mib=81559,
    compute_capability="9.0",
    architecture="Hopper",
    ecc_errors_corrected_volatile=0,
    power_limit_w=700.0,
)
H100_1 = dict(H100_0, index=1, bus_id="0000:2a:00.0", uuid="GPU-7d4b2a90-5e6f-4a1b-bc2d-3e4f5a6b7c8d")

# host -> what the facts must say. ``gpus``: a subset of each GPU's keys, in bus order; ``problems``:
# (code, severity, bus_id) in order; ``backend``: for the default run (NVML first) and the nvidia-smi run.
CASES = [
    dict(
        host="p4",
        gpu_count=1,
        usable=1,
        backend=("nvml", "nvidia-smi"),
        gpus=[P4],
        problems=[],
        driver=dict(loaded=True, version="535.261.03", kernel_module="proprietary", cuda_version="12.2"),
    ),
    dict(
        host="rtx4090",
        gpu_count=1,
        usable=1,
        backend=("nvml", "nvidia-smi"),
        gpus=[RTX4090],
        problems=[],
        driver=dict(loaded=True, version="550.127.05", kernel_module="open", cuda_version="12.4"),
        pci_functions=2,
    ),
    dict(
        host="h200",
        gpu_count=1,
        usable=1,
        backend=("nvml", "nvidia-smi"),
        gpus=[H200],
        problems=[],
        driver=dict(loaded=True, version="570.133.20", kernel_module="open", cuda_version="12.8"),
    ),
    dict(
        host="two_h100",
        gpu_count=2,
        usable=2,
        backend=("nvml", "nvidia-smi"),
        gpus=[H100_0, dict(H100_1, ecc_errors_corrected_volatile=3)],
        problems=[],
        driver=dict(loaded=True, version="550.90.07", kernel_module="proprietary", cuda_version="12.4"),
    ),
    dict(
        host="lost_gpu",
        gpu_count=2,
        usable=1,
        backend=("nvml", "nvidia-smi"),
        gpus=[dict(H100_0, temperature_c=33), dict(bus_id="0000:2a:00.0", state="lost", name="NVIDIA H100 80GB HBM3")],
        problems=[("gpu_lost", "error", "0000:2a:00.0")],
    ),
    dict(
        host="mismatch",
        gpu_count=1,
        usable=0,
        backend=(None, None),
        gpus=[dict(bus_id="0000:3b:00.0", state="unqueried", name="Tesla P4", uuid=P4["uuid"], index=None)],
        problems=[("driver_library_mismatch", "error", None)],
        driver=dict(loaded=True, version="535.216.01", library_version="535.261.03"),
        message=["535.216.01", "535.261.03", "0000:3b:00.0"],
    ),
    dict(
        host="no_driver",
        gpu_count=1,
        usable=0,
        backend=(None, None),
        gpus=[dict(bus_id="0000:01:00.0", state="no_driver", name="GeForce RTX 4090", kernel_driver=None)],
        problems=[("no_driver", "error", "0000:01:00.0")],
        driver=dict(loaded=False, version=None, kernel_module=None),
        pci_functions=2,
    ),
    dict(
        host="nouveau",
        gpu_count=1,
        usable=0,
        backend=(None, None),
        gpus=[dict(bus_id="0000:01:00.0", state="other_driver", kernel_driver="nouveau")],
        problems=[("nouveau_bound", "error", "0000:01:00.0")],
        driver=dict(loaded=False),
    ),
    dict(
        host="no_tools",
        gpu_count=1,
        usable=0,
        backend=(None, None),
        gpus=[dict(bus_id="0000:3b:00.0", state="unqueried", name="Tesla P4", uuid=P4["uuid"], source="proc")],
        problems=[("no_query_tool", "warning", None)],
        driver=dict(loaded=True, version="535.261.03", library_version=None),
        message=["0000:3b:00.0"],
    ),
    dict(
        host="old_driver",
        gpu_count=1,
        usable=1,
        backend=("nvidia-smi", "nvidia-smi"),
        gpus=[dict(P4, memory_total_mib=7611, compute_capability=None, architecture=None, temperature_c=35)],
        problems=[],
        driver=dict(loaded=True, version="470.256.02", cuda_version="11.4"),
    ),
    dict(
        host="no_gpu",
        gpu_count=0,
        usable=0,
        backend=(None, None),
        gpus=[],
        problems=[],
        driver=dict(loaded=False, version=None),
        pci_functions=0,
    ),
]


@pytest.fixture
def nvml(monkeypatch):
    """Put a ``pynvml`` into sys.modules (None makes ``import pynvml`` raise ImportError)."""

    def install(fake):
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def run_host(host_name, tmp_path, capsys, nvml, use_nvml=True, fake=harness.fake_nvml_for, check_mode=False, **args):
    host = harness.load_host(host_name)
    root = harness.materialize(host, tmp_path / "root")
    smi = harness.replay_program(host, "nvidia-smi", tmp_path / "bin")
    lspci = harness.replay_program(host, "lspci", tmp_path / "bin")
    installed = None
    if use_nvml:
        installed = nvml(fake(host) if callable(fake) else fake)
    params = dict(root=str(root), use_nvml=use_nvml, nvidia_smi=smi, lspci=lspci)
    params.update(args)
    result = run_module(gpu_facts.main, params, capsys, check_mode=check_mode)
    assert not result.get("failed"), result
    assert result["changed"] is False
    facts = result["ansible_facts"]["sovereign_gpu"]
    return facts, dict(nvml=installed, smi=smi, lspci=lspci)


def _check(facts, case):
    assert facts["gpu_count"] == case["gpu_count"]
    assert facts["usable_gpu_count"] == case["usable"]
    assert len(facts["gpus"]) == len(case["gpus"])
    for gpu, expected in zip(facts["gpus"], case["gpus"], strict=True):
        assert {key: gpu[key] for key in expected} == expected, gpu
        assert set(gpu) == set(_GPU_KEYS)
    seen = [(p["code"], p["severity"], p["bus_id"]) for p in facts["problems"]]
    assert seen == case["problems"], facts["problems"]
    for problem in facts["problems"]:
        assert problem["message"] and problem["fix"], problem
        if problem["bus_id"]:
            assert problem["bus_id"] in problem["message"]
    for fragment in case.get("message", []):
        assert fragment in facts["problems"][0]["message"], facts["problems"][0]
    for key, value in (case.get("driver") or {}).items():
        assert facts["driver"][key] == value, (key, facts["driver"])
    if "pci_functions" in case:
        assert len(facts["pci_devices"]) == case["pci_functions"]
    # Non-NVIDIA display devices (the BMC's VGA) are never GPUs.
    assert all(device["vendor_id"] == "0x10de" for device in facts["pci_devices"])


_GPU_KEYS = [
    "index",
    "bus_id",
    "name",
    "uuid",
    "state",
    "kernel_driver",
    "pci_device_id",
    "memory_total_mib",
    "compute_capability",
    "architecture",
    "persistence_mode",
    "ecc_mode",
    "ecc_mode_pending",
    "ecc_errors_corrected_volatile",
    "ecc_errors_uncorrected_volatile",
    "temperature_c",
    "power_limit_w",
    "source",
    "notes",
]


@pytest.mark.parametrize("case", CASES, ids=[c["host"] for c in CASES])
def test_host_nvml_first(tmp_path, capsys, nvml, case):
    facts, tools = run_host(case["host"], tmp_path, capsys, nvml)
    _check(facts, case)
    assert facts["backend"] == case["backend"][0]
    if facts["backend"] == "nvml":
        # NVML answered: nvidia-smi was never run, and NVML was shut down after use.
        assert harness.calls(tools["smi"]) == []
        assert tools["nvml"].calls[0] == "nvmlInit"
        assert tools["nvml"].calls[-1] == "nvmlShutdown"
        assert facts["backend_errors"] == []
        assert all(gpu["source"] == "nvml" for gpu in facts["gpus"] if gpu["state"] == "ok")


@pytest.mark.parametrize("case", CASES, ids=[c["host"] for c in CASES])
def test_host_nvidia_smi(tmp_path, capsys, nvml, case):
    facts, tools = run_host(case["host"], tmp_path, capsys, nvml, use_nvml=False)
    _check(facts, case)
    assert facts["backend"] == case["backend"][1]
    host = harness.load_host(case["host"])
    if "nvidia-smi" in host.get("commands", {}):
        assert harness.calls(tools["smi"]), "nvidia-smi was not run"
        assert all(args != "replay" for args in harness.calls(tools["smi"]))
    if any(device for device in facts["pci_devices"]):
        assert harness.calls(tools["lspci"]) == [["-Dnn", "-d", "10de:"]]


@pytest.mark.parametrize("case", [c for c in CASES if c["backend"][0] == "nvml"], ids=lambda c: c["host"])
def test_both_backends_agree(tmp_path, capsys, nvml, case):
    """NVML and nvidia-smi, reading the same host, give the same facts (but for the backend's own fields)."""
    by_nvml, _tools = run_host(case["host"], tmp_path / "a", capsys, nvml)
    by_smi, _tools = run_host(case["host"], tmp_path / "b", capsys, nvml, use_nvml=False)
    for facts in (by_nvml, by_smi):
        for gpu in facts["gpus"]:
            gpu.pop("source")
            gpu.pop("notes")
            if gpu["state"] == "lost":
                gpu.pop("index")  # NVML knows the index of a GPU it cannot open; nvidia-smi does not say
        facts["driver"].pop("nvml_version")
        facts.pop("backend")
        facts.pop("backend_errors")
        for problem in facts["problems"]:
            problem.pop("message")
            if problem["code"] == "gpu_lost":
                problem.pop("index")
    assert by_nvml == by_smi


def test_check_mode_reads_the_same(tmp_path, capsys, nvml):
    normal, _tools = run_host("p4", tmp_path / "a", capsys, nvml)
    checked, _tools = run_host("p4", tmp_path / "b", capsys, nvml, check_mode=True)
    assert checked == normal


def test_nvidia_smi_is_not_used_when_disabled(tmp_path, capsys, nvml):
    facts, tools = run_host("p4", tmp_path, capsys, nvml, use_nvml=False, nvidia_smi="")
    assert facts["backend"] is None
    assert harness.calls(tools["smi"]) == []
    assert facts["gpus"][0]["state"] == "unqueried"
    assert [p["code"] for p in facts["problems"]] == ["no_query_tool"]


# ---------------------------------------------------------------------------------------------------------------
# NVML failures, through the stand-in
# ---------------------------------------------------------------------------------------------------------------


def _p4_nvml(**device_changes):
    host = harness.load_host("p4")
    fake = harness.fake_nvml_for(host)
    fake.devices[0].update(device_changes)
    return fake


NVML_FAILURES = [
    # (id, host, stand-in, expected problems (code, bus_id), GPU state)
    (
        "driver-not-loaded",
        "no_driver",
        lambda h: harness.FakeNVML(init_error=9),
        [("no_driver", "0000:01:00.0")],
        "no_driver",
    ),
    (
        "library-not-found",
        "no_tools",
        lambda h: harness.FakeNVML(init_error=12),
        [("no_query_tool", None)],
        "unqueried",
    ),
    (
        "version-mismatch",
        "mismatch",
        lambda h: harness.FakeNVML(init_error=18),
        [("driver_library_mismatch", None)],
        "unqueried",
    ),
    ("no-permission", "no_tools", lambda h: harness.FakeNVML(init_error=4), [("no_permission", None)], "unqueried"),
    ("handle-unknown-error", "p4", lambda h: _p4_nvml(handle_error=999), [("gpu_lost", "0000:3b:00.0")], "lost"),
    ("handle-gpu-is-lost", "p4", lambda h: _p4_nvml(handle_error=15), [("gpu_lost", "0000:3b:00.0")], "lost"),
    (
        "query-gpu-is-lost",
        "p4",
        lambda h: _p4_nvml(errors={"nvmlDeviceGetMemoryInfo": 15}),
        [("gpu_lost", "0000:3b:00.0")],
        "lost",
    ),
    (
        "reset-required",
        "p4",
        lambda h: _p4_nvml(handle_error=16),
        [("reset_required", "0000:3b:00.0")],
        "reset_required",
    ),
    (
        "uncorrectable-ecc",
        "p4",
        lambda h: _p4_nvml(ecc_uncorrected=2),
        [("ecc_uncorrected_errors", "0000:3b:00.0")],
        "ok",
    ),
    ("ecc-pending-off", "p4", lambda h: _p4_nvml(ecc=[1, 0]), [("ecc_mode_pending", "0000:3b:00.0")], "ok"),
]


@pytest.mark.parametrize(
    ("host", "fake", "problems", "state"), [f[1:] for f in NVML_FAILURES], ids=[f[0] for f in NVML_FAILURES]
)
def test_nvml_failures(tmp_path, capsys, nvml, host, fake, problems, state):
    # nvidia-smi off: what NVML alone reports.
    facts, tools = run_host(host, tmp_path, capsys, nvml, fake=fake, nvidia_smi="")
    assert [(p["code"], p["bus_id"]) for p in facts["problems"]] == problems, facts["problems"]
    assert facts["gpus"][0]["state"] == state
    assert facts["gpu_count"] == 1
    if "nvmlDeviceGetCount" in tools["nvml"].calls:
        assert tools["nvml"].calls[-1] == "nvmlShutdown"


def test_nvml_unsupported_fields_are_null_without_notes(tmp_path, capsys, nvml):
    fake = _p4_nvml(temperature=None, power_limit=None, errors={"nvmlDeviceGetUUID": 4})
    facts, _tools = run_host("p4", tmp_path, capsys, nvml, fake=fake, nvidia_smi="")
    gpu = facts["gpus"][0]
    assert (gpu["temperature_c"], gpu["power_limit_w"], gpu["state"]) == (None, None, "ok")
    # Not supported is silent; a refused query is noted, and the kernel module's UUID is kept.
    assert gpu["notes"] == ["uuid: Insufficient Permissions"]
    assert gpu["uuid"] == P4["uuid"]


def test_old_pynvml_bytes_strings(tmp_path, capsys, nvml):
    fake = harness.fake_nvml_for(harness.load_host("rtx4090"))
    fake.bytes_strings = True
    facts, _tools = run_host("rtx4090", tmp_path, capsys, nvml, fake=fake)
    assert {k: facts["gpus"][0][k] for k in RTX4090} == RTX4090
    assert facts["driver"]["library_version"] == "550.127.05"


def test_pynvml_not_installed_falls_back_to_nvidia_smi(tmp_path, capsys, nvml):
    facts, _tools = run_host("p4", tmp_path, capsys, nvml, fake=None)
    assert facts["backend"] == "nvidia-smi"
    assert "nvidia-ml-py" in facts["backend_errors"][0]
    assert {k: facts["gpus"][0][k] for k in P4} == P4


def test_nvml_that_hangs_is_a_timeout_problem(tmp_path, capsys, nvml):
    release = threading.Event()
    fake = _p4_nvml()
    fake.nvmlInit = lambda: release.wait(30)
    started = time.monotonic()
    try:
        facts, _tools = run_host("p4", tmp_path, capsys, nvml, fake=fake, nvidia_smi="", timeout=1)
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert [p["code"] for p in facts["problems"]] == ["query_timeout"]
    assert "0000:3b:00.0" in facts["problems"][0]["message"]


def test_nvidia_smi_that_hangs_is_killed(tmp_path, capsys, nvml):
    hung = tmp_path / "hung-nvidia-smi"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    started = time.monotonic()
    facts, _tools = run_host("p4", tmp_path, capsys, nvml, use_nvml=False, nvidia_smi=str(hung), timeout=1)
    assert time.monotonic() - started < 15
    assert [p["code"] for p in facts["problems"]] == ["query_timeout"]


def test_nvidia_smi_no_devices_while_sysfs_has_them(tmp_path, capsys, nvml):
    """nvidia-smi answers but lists nothing (RmInitAdapter failed for both H100s): each is not_reported."""
    empty = tmp_path / "empty-nvidia-smi"
    empty.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    empty.chmod(0o755)
    facts, _tools = run_host("two_h100", tmp_path, capsys, nvml, use_nvml=False, nvidia_smi=str(empty))
    assert facts["backend"] == "nvidia-smi"
    assert [g["state"] for g in facts["gpus"]] == ["not_reported", "not_reported"]
    assert [(p["code"], p["bus_id"]) for p in facts["problems"]] == [
        ("gpu_not_reported", "0000:18:00.0"),
        ("gpu_not_reported", "0000:2a:00.0"),
    ]


def test_lost_gpu_nvidia_smi_evidence(tmp_path, capsys, nvml):
    facts, _tools = run_host("lost_gpu", tmp_path, capsys, nvml, use_nvml=False)
    lost = facts["gpus"][1]
    assert lost["state"] == "lost"
    assert any("Unable to determine the device handle" in note for note in lost["notes"])
    assert any("rev ff" in note for note in lost["notes"])
    assert "XID 79" in facts["problems"][0]["fix"]


# ---------------------------------------------------------------------------------------------------------------
# Options, the real machine, the real nvidia-ml-py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [(dict(timeout=0), "timeout must be at least 1"), (dict(root="/nonexistent/root"), "is not a directory")],
)
def test_bad_options_fail_clearly(capsys, args, message):
    result = run_module(gpu_facts.main, dict(args, use_nvml=False, nvidia_smi="", lspci=""), capsys)
    assert result["failed"] is True
    assert message in result["msg"]


def _real_nvidia_devices():
    found = []
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(path) as handle:
            if handle.read().strip() == "0x10de":
                found.append(os.path.dirname(path))
    return found


@pytest.mark.skipif(
    bool(_real_nvidia_devices()), reason="this machine has an NVIDIA device; the test is for one without"
)
def test_this_machine_has_no_gpu(capsys):
    """The real /sys and /proc, the real PATH (no nvidia-smi here), and whatever pynvml is installed."""
    result = run_module(gpu_facts.main, {}, capsys)
    facts = result["ansible_facts"]["sovereign_gpu"]
    assert (facts["gpu_count"], facts["usable_gpu_count"], facts["gpus"], facts["problems"]) == (0, 0, [], [])
    assert facts["driver"]["loaded"] is False


REAL_PYNVML = importlib.util.find_spec("pynvml") is not None


@pytest.mark.skipif(not REAL_PYNVML, reason="nvidia-ml-py is not installed in this environment")
def test_fake_nvml_matches_real_pynvml():
    """The stand-in has the real module's functions, constants, error classes, codes and messages."""
    import pynvml

    for name in harness.FAKE_NVML_FUNCTIONS:
        assert callable(getattr(pynvml, name, None)), name
    for name in harness.FAKE_NVML_CONSTANTS:
        real, fake = getattr(pynvml, name), getattr(harness.FakeNVML, name)
        if isinstance(fake, int):
            assert real == fake, name
        else:
            assert real.__name__ == fake.__name__ and issubclass(real, pynvml.NVMLError), name
    for code in harness.NVML_ERRORS:
        real, fake = pynvml.NVMLError(code), harness.NVMLError(code)
        assert (type(real).__name__, str(real), real.value) == (type(fake).__name__, str(fake), fake.value)


@pytest.mark.skipif(
    not REAL_PYNVML or bool(glob.glob("/usr/lib/*/libnvidia-ml.so*")),
    reason="needs nvidia-ml-py installed and no NVIDIA driver library on this machine",
)
def test_real_pynvml_without_driver_library(capsys, tmp_path):
    """The real nvidia-ml-py on this GPU-less machine: NVML cannot load libnvidia-ml.so.1 (error 12)."""
    result = run_module(gpu_facts.main, dict(root=str(tmp_path), nvidia_smi="", lspci=""), capsys)
    facts = result["ansible_facts"]["sovereign_gpu"]
    assert facts["backend_errors"][0] == "NVML: NVML Shared Library Not Found (NVML error 12)"
    assert (facts["gpu_count"], facts["problems"]) == (0, [])
