# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The GPU health gate's decisions (roles/nvidia_gpu/files/sovereign_gpu_health.py).

The decision functions (XID parsing and classes, the expected-TFLOPs table, judge_gpu, judge_host) run on
recorded inputs: kernel logs in the kernel's XID format (recorded/, reconstructed like gpu_fixtures/: no GPU
here), the recorded hosts' GPU names, and measured figures as the program produces them. NVML is the double of
nvml_double.py. What could not run here: the memory test and the timed matmul on a real GPU, and NVML/XIDs
from a real driver (scripts/gpu-proof.sh does that on a GPU host). The program itself runs for real on this
CPU-only machine and must say "no GPU".
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.gpu_fixtures import harness
from ansible_collections.sovereign.mlops.tests.unit.roles.nvidia_gpu import nvml_double
from prometheus_client.parser import text_string_to_metric_families

gate = nvml_double.load_program("sovereign_gpu_health")
TABLE = yaml.safe_load((nvml_double.ROOT / "roles/nvidia_gpu/defaults/main.yml").read_text())[
    "nvidia_gpu_health_expected"
]
PROGRAM = nvml_double.FILES / "sovereign_gpu_health.py"


def recorded(name):
    return (nvml_double.RECORDED / name).read_text()


def gpu(index=0, name="Tesla P4", bus_id="00000000:3B:00.0", tflops=4.7, dtype="float32", **extra):
    return dict(index=index, name=name, uuid=f"GPU-{index}", bus_id=bus_id, tflops=tflops, dtype=dtype, **extra)


def verdict(measured, xids=(), tolerance=0.25, unknown="pass"):
    return gate.judge_gpu(measured, gate.expected_for(measured["name"], TABLE), list(xids), tolerance, unknown)


# --- the table -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "match"),
    [("p4", "Tesla P4"), ("rtx4090", "RTX 4090"), ("h200", "H200"), ("two_h100", "H100")],
)
def test_every_recorded_card_has_an_expected_figure(host, match):
    """The recorded hosts' names as NVML gives them (gpu_fixtures CSV) find their entry, not a neighbour's."""
    names = {d["name"] for d in harness.nvml_devices_from_csv(harness.load_host(host)) if "name" in d}
    for name in names:
        assert gate.expected_for(name, TABLE)["match"] == match


def test_h100_pcie_is_not_taken_for_the_sxm_figure():
    assert gate.expected_for("NVIDIA H100 PCIe", TABLE)["match"] == "H100 PCIe"
    assert gate.expected_for("NVIDIA L4", TABLE)["match"] == "\\bL4\\b"
    assert gate.expected_for("NVIDIA L40S", TABLE)["match"] == "L40S"
    assert gate.expected_for("NVIDIA A100-SXM4-80GB", TABLE)["match"] == "A100"


def test_every_entry_names_a_dtype_the_gate_runs():
    for entry in TABLE:
        assert entry["dtype"] in ("float16", "bfloat16", "float32") and entry["tflops"] > 0


# --- XIDs ----------------------------------------------------------------------------------------------------


def test_xids_are_read_from_the_kernel_log_with_their_class_and_bus():
    xids = gate.parse_xids(recorded("kernel-two_h100-xid.txt"))
    assert [(x["bus"], x["xid"], x["xid_class"]) for x in xids] == [
        ("0000:18:00", 13, "application"),
        ("0000:18:00", 13, "application"),
        ("0000:2a:00", 79, "reset"),
    ]
    assert xids[2]["text"].startswith("pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")


def test_a_clean_boot_has_no_xid():
    assert gate.parse_xids(recorded("kernel-two_h100-clean.txt")) == []


@pytest.mark.parametrize(
    ("xid", "xid_class"),
    [(79, "reset"), (48, "reset"), (119, "reset"), (94, "restart_app"), (13, "application"), (63, "info"),
     (92, "info"), (999, "unknown")],
)  # fmt: skip
def test_xid_classes(xid, xid_class):
    assert gate.xid_class(xid) == xid_class


def test_exporter_and_gate_classify_alike():
    exporter = nvml_double.load_program("sovereign_gpu_exporter")
    for xid in range(0, 200):
        assert exporter.xid_class(xid) == gate.xid_class(xid), xid


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("00000000:3B:00.0", "0000:3b:00"), ("0000:2a:00", "0000:2a:00"), ("3b:00.0", "0000:3b:00")],
)
def test_bus_ids_from_nvml_and_the_kernel_meet(raw, normal):
    assert gate.normalize_bus_id(raw) == normal


# --- one GPU -------------------------------------------------------------------------------------------------


def test_a_p4_at_its_figure_passes():
    v = verdict(gpu(tflops=4.62, memory_tested_bytes=6 << 30))
    assert v["passed"] and v["reasons"] == [] and v["min_tflops"] == pytest.approx(3.38, abs=0.01)


def test_a_slow_gpu_fails_naming_itself_and_the_figures():
    v = verdict(gpu(tflops=2.1))
    assert not v["passed"]
    assert v["label"] == "GPU 0 (Tesla P4, 00000000:3B:00.0)"
    assert v["reasons"] == ["achieved 2.1 TFLOPs (float32), below 3.4 (expected 4.5 for 'Tesla P4' less 25%)"]


def test_just_above_the_tolerance_passes_just_below_fails():
    assert verdict(gpu(tflops=3.376))["passed"]
    assert not verdict(gpu(tflops=3.374))["passed"]


def test_a_reset_class_xid_fails_only_its_own_gpu():
    xids = gate.parse_xids(recorded("kernel-two_h100-xid.txt"))
    g0 = verdict(gpu(0, "NVIDIA H100 80GB HBM3", "00000000:18:00.0", 640.0, "float16"), xids)
    g1 = verdict(gpu(1, "NVIDIA H100 80GB HBM3", "00000000:2A:00.0", 610.0, "float16"), xids)
    assert g0["passed"], g0
    assert g0["warnings"] == ["XID 13 (application), 13 (application) in this boot's kernel log"]
    assert not g1["passed"]
    assert g1["reasons"] == [
        "XID 79 in this boot's kernel log (reset/reboot class: pid='<unknown>', name=<unknown>, GPU has fallen off "
        "the bus.); reset the GPU or reboot the host"
    ]


def test_a_contained_ecc_xid_warns():
    xids = gate.parse_xids(recorded("kernel-h200-xid94.txt"))
    v = verdict(gpu(0, "NVIDIA H200", "00000000:18:00.0", 700.0, "float16"), xids)
    assert v["passed"]
    assert v["warnings"] == ["XID 94 (restart_app), 63 (info) in this boot's kernel log"]


@pytest.mark.parametrize(
    ("ecc", "reason"),
    [
        (dict(uncorrected_volatile=2), "2 uncorrectable ECC errors since the driver loaded"),
        (dict(retired_pages_pending=1), "retired pages are pending: reset the GPU so they take effect"),
        (dict(remapped_rows_pending=1, remapped_rows_failure=0),
         "row remapping is pending: reset the GPU so it takes effect"),
        (dict(remapped_rows_pending=1, remapped_rows_failure=1), "row remapping failed: the GPU needs service (RMA)"),
    ],
)  # fmt: skip
def test_ecc_problems_fail(ecc, reason):
    v = verdict(gpu(tflops=4.6, ecc=ecc))
    assert v["reasons"] == [reason]


def test_corrected_errors_alone_pass():
    assert verdict(gpu(tflops=4.6, ecc=dict(uncorrected_volatile=0, retired_pages_pending=0)))["passed"]


def test_memory_and_compute_errors_are_quoted():
    v = verdict(gpu(tflops=None, memory_error="RuntimeError: chunk 3 read back wrong", compute_error="OOM"))
    assert v["reasons"] == ["memory test failed: RuntimeError: chunk 3 read back wrong", "matmul failed: OOM"]


def test_an_unknown_model_warns_or_fails_as_configured():
    unknown = gpu(name="NVIDIA B200", tflops=1500.0)
    assert verdict(unknown)["passed"]
    assert "add an entry to nvidia_gpu_health_expected" in verdict(unknown)["warnings"][0]
    assert not verdict(unknown, unknown="fail")["passed"]


def test_a_per_model_tolerance_wins():
    table = [dict(match="P4", tflops=4.5, tolerance=0.5, dtype="float32")]
    assert gate.judge_gpu(gpu(tflops=2.3), table[0], [], 0.25, "pass")["passed"]


# --- the host ------------------------------------------------------------------------------------------------


def test_no_gpu_and_none_expected_is_a_clear_no_gpu():
    v = gate.judge_host([], "NVML: NVML Shared Library Not Found", 0, [])
    assert v == dict(status="no_gpu", passed=True, reasons=[], summary="no GPU: NVML: NVML Shared Library Not Found")


def test_no_gpu_on_a_host_that_had_one_fails():
    v = gate.judge_host([], "NVML: Driver Not Loaded", 1, [])
    assert v["status"] == "fail"
    assert v["summary"] == "no GPU: NVML: Driver Not Loaded; this host had 1 at provisioning"


def test_a_host_fails_with_every_gpu_reason_named():
    good = verdict(gpu(0, tflops=4.6))
    bad = verdict(gpu(1, bus_id="00000000:5E:00.0", tflops=1.0))
    v = gate.judge_host([good, bad], None, 3, [])
    assert v["status"] == "fail"
    assert v["reasons"][0] == "2 GPUs answer, 3 were there at provisioning"
    assert v["reasons"][1].startswith("GPU 1 (Tesla P4, 00000000:5E:00.0): achieved 1.0 TFLOPs")


def test_metric_lines_parse_as_prometheus_text():
    result = dict(
        status="fail",
        passed=False,
        gpu_count=2,
        gpus=[verdict(gpu(0, tflops=4.6)), verdict(gpu(1, name='odd "name"', tflops=None))],
    )
    families = {f.name: f for f in text_string_to_metric_families("\n".join(gate.metric_lines(result)) + "\n")}
    passed = {(s.labels["gpu"], s.labels["status"]): s.value for s in families["sovereign_gpu_health_passed"].samples}
    assert passed == {("all", "fail"): 0, ("0", "pass"): 1, ("1", "pass"): 1}
    assert [s.value for s in families["sovereign_gpu_health_tflops"].samples] == [4.6]
    assert families["sovereign_gpu_health_gpus"].samples[0].value == 2


# --- the program, for real on this CPU-only machine ----------------------------------------------------------


def test_the_program_says_no_gpu_on_this_machine(tmp_path):
    metrics = tmp_path / "sovereign_gpu_health.prom"
    out = subprocess.run(
        [sys.executable, str(PROGRAM), "--result", str(tmp_path / "health.json"), "--metrics-file", str(metrics)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sovereign-gpu-health: no_gpu: no GPU: NVML: ")
    assert "torch sees no CUDA device" in out.stdout
    result = json.loads((tmp_path / "health.json").read_text())
    assert result["status"] == "no_gpu" and result["gpus"] == [] and result["passed"] is True
    assert 'sovereign_gpu_health_passed{gpu="all",status="no_gpu"} 1' in metrics.read_text()


def test_the_program_fails_a_host_that_had_gpus(tmp_path):
    out = subprocess.run(
        [sys.executable, str(PROGRAM), "--result", str(tmp_path / "h.json"), "--expected-gpus", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    assert "this host had 2 at provisioning" in out.stdout


def test_the_program_appends_to_the_job_wrappers_file(tmp_path, monkeypatch):
    metrics = tmp_path / "sovereign_gpu_health.prom"
    metrics.write_text('sovereign_job_success{job="gpu_health"} 1\n')
    monkeypatch.setenv("SOVEREIGN_JOB_METRICS_FILE", str(metrics))
    assert gate.main(["--result", str(tmp_path / "h.json")]) == 0
    text = metrics.read_text()
    assert text.startswith('sovereign_job_success{job="gpu_health"} 1\n')
    assert "sovereign_gpu_health_gpus 0" in text


def test_nvml_sees_gpus_torch_does_not(tmp_path, monkeypatch):
    """NVML (the double, two recorded H100s with 3 corrected errors on GPU 1) answers, the CPU build of torch sees
    no CUDA device: the gate fails and says why, per host and with each GPU's ECC state read."""
    double = nvml_double.nvml_for(
        "two_h100", readings={1: dict(retired_pending=0, remapped=(0, 0, 0, 0)), 0: dict(remapped=(0, 0, 1, 0))}
    )
    monkeypatch.setitem(sys.modules, "pynvml", double)
    log = tmp_path / "kern.log"
    log.write_text(recorded("kernel-two_h100-clean.txt"))
    result_path = tmp_path / "h.json"
    rc = gate.main(["--result", str(result_path), "--kernel-log", str(log), "--expected-gpus", "2"])
    result = json.loads(result_path.read_text())
    assert rc == 1
    assert result["reasons"][0].startswith("NVML sees 2 GPUs but torch sees no CUDA device (torch ")
    assert [g["name"] for g in result["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    assert result["gpus"][0]["reasons"] == ["row remapping is pending: reset the GPU so it takes effect"]
    assert result["gpus"][1]["ecc"] == dict(uncorrected_volatile=0, retired_pages_pending=0, remapped_rows_pending=0,
                                            remapped_rows_failure=0, notes=[])  # fmt: skip
    assert double.init_depth == 0  # nvmlShutdown followed nvmlInit


def test_bad_options_are_refused():
    with pytest.raises(SystemExit) as exc:
        gate.parse_args(["--result", "/dev/null", "--memory-fraction", "1.5"])
    assert exc.value.code == 2


def test_the_recorded_logs_are_in_the_kernels_format():
    for path in pathlib.Path(nvml_double.RECORDED).glob("kernel-*.txt"):
        for line in path.read_text().splitlines():
            assert line.startswith("[") and "] " in line and " kernel: " in line, (path.name, line)
