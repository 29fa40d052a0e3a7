# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The NVML exporter (roles/nvidia_gpu/files/sovereign_gpu_exporter.py).

NVML is a double here (nvml_double.GpuNVML, driven by the recorded hosts of gpu_fixtures/ plus the readings each
test adds): there is no GPU on the machines these tests run on. What could not run here: the exporter against a
real driver, and real XID events from NVML's event set. The exporter process itself runs for real below, with the
real nvidia-ml-py, which finds no NVML library on this machine: it must serve nvml_up 0 and a GPU count of 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
from ansible_collections.sovereign.mlops.tests.unit.roles.nvidia_gpu import nvml_double
from ports import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

exporter = nvml_double.load_program("sovereign_gpu_exporter")
GiB = 1024**3


def scrape(state, expected_gpus=0):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.Collector(state, expected_gpus))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, text


def value(samples, metric, /, **labels):
    return samples[(metric, tuple(sorted(labels.items())))]


def test_an_h100_pair_is_read_in_native_units():
    double = nvml_double.nvml_for(
        "two_h100",
        readings={
            0: dict(utilization=87, memory_used=71 * GiB, power_usage=612_500, remapped=(2, 0, 0, 0)),
            1: dict(utilization=3, memory_used=GiB, power_usage=88_000, ecc_corrected_aggregate=41,
                    ecc_uncorrected_aggregate=0, remapped=(0, 1, 1, 0)),
        },
    )  # fmt: skip
    snap = exporter.collect(double)
    assert snap.nvml_up and snap.driver_version == "550.90.07" and len(snap.gpus) == 2
    samples, _text = scrape({"snapshot": snap}, expected_gpus=2)
    uuid0, uuid1 = (g["uuid"] for g in snap.gpus)
    assert value(samples, "sovereign_gpu_count") == 2
    assert value(samples, "sovereign_gpu_expected_count") == 2
    assert value(samples, "sovereign_gpu_utilization_ratio", gpu="0", uuid=uuid0) == pytest.approx(0.87)
    assert value(samples, "sovereign_gpu_memory_used_bytes", gpu="0", uuid=uuid0) == 71 * GiB
    assert value(samples, "sovereign_gpu_memory_total_bytes", gpu="1", uuid=uuid1) == 81559 * 1024 * 1024
    assert value(samples, "sovereign_gpu_temperature_celsius", gpu="1", uuid=uuid1) == 31
    assert value(samples, "sovereign_gpu_power_watts", gpu="0", uuid=uuid0) == pytest.approx(612.5)
    assert value(samples, "sovereign_gpu_power_limit_watts", gpu="0", uuid=uuid0) == 700
    ecc = dict(gpu="1", uuid=uuid1)
    assert value(samples, "sovereign_gpu_ecc_errors", type="corrected", counter="volatile", **ecc) == 3
    assert value(samples, "sovereign_gpu_ecc_errors", type="corrected", counter="aggregate", **ecc) == 41
    assert value(samples, "sovereign_gpu_ecc_errors", type="uncorrected", counter="volatile", **ecc) == 0
    assert value(samples, "sovereign_gpu_remapped_rows", type="uncorrectable", **ecc) == 1
    assert value(samples, "sovereign_gpu_remapped_rows_pending", **ecc) == 1
    assert value(samples, "sovereign_gpu_remapped_rows_failure", gpu="0", uuid=uuid0) == 0
    info = dict(gpu="0", uuid=uuid0, name="NVIDIA H100 80GB HBM3", bus_id="00000000:18:00.0")
    info["driver_version"] = "550.90.07"
    assert value(samples, "sovereign_gpu_info", **info) == 1
    assert double.init_depth == 0


def test_a_p4_reports_retired_pages_and_no_remapping():
    """Pascal retires pages (no row remapping): the retired-pages series are there, the remapped ones are not."""
    reading = dict(utilization=0, power_usage=23_000, retired_sbe=[0x1A2B], retired_dbe=[], retired_pending=1)
    double = nvml_double.nvml_for("p4", readings={0: reading})
    samples, text = scrape({"snapshot": exporter.collect(double)})
    uuid = "GPU-5b3a0a4e-8f7c-6d21-9e0b-3c4d5e6f7a81"
    assert value(samples, "sovereign_gpu_retired_pages", gpu="0", uuid=uuid, cause="single_bit") == 1
    assert value(samples, "sovereign_gpu_retired_pages", gpu="0", uuid=uuid, cause="double_bit") == 0
    assert value(samples, "sovereign_gpu_retired_pages_pending", gpu="0", uuid=uuid) == 1
    assert not any(name.startswith("sovereign_gpu_remapped_rows") for name, _labels in samples)
    assert "# TYPE sovereign_gpu_remapped_rows gauge" in text  # the family is declared, with no sample


def test_a_geforce_without_ecc_has_no_ecc_series():
    double = nvml_double.nvml_for("rtx4090", readings={0: dict(utilization=55, power_usage=301_000)})
    snap = exporter.collect(double)
    samples, _text = scrape({"snapshot": snap})
    assert not any(name == "sovereign_gpu_ecc_errors" for name, _labels in samples)
    assert snap.gpus[0]["errors"] == []  # NOT_SUPPORTED is not an error, only absent


def test_a_lost_gpu_is_not_counted():
    double = nvml_double.nvml_for("lost_gpu", readings={0: dict(utilization=1, power_usage=70_000)})
    samples, _text = scrape({"snapshot": exporter.collect(double)}, expected_gpus=2)
    assert value(samples, "sovereign_gpu_count") == 1
    assert value(samples, "sovereign_gpu_expected_count") == 2


def test_a_driver_library_mismatch_serves_nvml_down_with_the_reason():
    double = nvml_double.nvml_for("mismatch")
    samples, _text = scrape({"snapshot": exporter.collect(double)}, expected_gpus=1)
    error = "NVML: RM has detected an NVML/RM version mismatch."
    assert value(samples, "sovereign_gpu_exporter_nvml_up", error=error) == 0
    assert value(samples, "sovereign_gpu_count") == 0


def test_xid_events_are_counted_per_gpu_xid_and_class():
    double = nvml_double.nvml_for("two_h100", events=[(1, 79), (0, 13), (0, 13), (0, 94)])
    watcher = exporter.XidWatcher(double, wait_ms=1)
    event_set, by_handle = watcher.register()
    assert [r[1] for r in double.registered] == [8, 8]  # nvmlEventTypeXidCriticalError on both GPUs
    while watcher.wait_once(event_set, by_handle):
        pass
    snap = exporter.collect(double)
    samples, _text = scrape({"snapshot": snap, "watcher": watcher})
    uuid0, uuid1 = (g["uuid"] for g in snap.gpus)
    xid_total = "sovereign_gpu_xid_errors_total"
    assert value(samples, xid_total, gpu="1", uuid=uuid1, xid="79", **{"class": "reset"}) == 1
    assert value(samples, xid_total, gpu="0", uuid=uuid0, xid="13", **{"class": "application"}) == 2
    assert value(samples, xid_total, gpu="0", uuid=uuid0, xid="94", **{"class": "restart_app"}) == 1
    # Every class starts at 0 on every GPU, so increase() sees the first event.
    assert value(samples, xid_total, gpu="1", uuid=uuid1, xid="", **{"class": "restart_app"}) == 0


def test_a_failed_event_wait_is_reported_not_fatal():
    double = nvml_double.nvml_for("p4")

    def broken_wait(*_args):
        raise nvml_double.harness.NVMLError(999)

    double.nvmlEventSetWait_v2 = broken_wait
    watcher = exporter.XidWatcher(double, wait_ms=1)
    watcher.run_forever()
    samples, _text = scrape({"snapshot": exporter.collect(double), "watcher": watcher})
    assert value(samples, "sovereign_gpu_exporter_xid_watch_up", error="XID event wait failed: Unknown Error") == 0


def test_the_exporter_serves_nvml_down_on_this_machine():
    """The real program with the real nvidia-ml-py: NVML finds no library here; it serves that, it does not exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(nvml_double.FILES / "sovereign_gpu_exporter.py"), "--port", str(port),
         "--expected-gpus", "1", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, text = time.monotonic() + 30, None
        while time.monotonic() < deadline and text is None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        assert text is not None, "the exporter did not answer within 30 s"
        assert 'sovereign_gpu_exporter_nvml_up{error="NVML: NVML Shared Library Not Found"} 0.0' in text
        assert "sovereign_gpu_count 0.0" in text and "sovereign_gpu_expected_count 1.0" in text
        assert 'sovereign_gpu_exporter_xid_watch_up{error="not started"} 0.0' in text
    finally:
        proc.terminate()
        proc.wait(10)
