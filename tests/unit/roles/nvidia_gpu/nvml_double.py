# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The NVML double for the nvidia_gpu role's programs (exporter, health gate), and a loader for them.

**A double, not NVML**: there is no NVIDIA GPU on the machines these tests run on (the real nvidia-ml-py here
fails with NVML error 12, library not found). It extends gpu_facts' stand-in
(tests/unit/plugins/modules/gpu_fixtures/harness.py FakeNVML, whose names and codes
``test_fake_nvml_matches_real_pynvml`` holds to the real bindings) with what the exporter reads: utilization,
memory in use, power draw, aggregate ECC counters, retired pages, row remapping and the XID event set. Its
per-GPU values come from the recorded hosts (gpu_fixtures/<host>/nvidia-smi-query-gpu.csv) with the readings a
test adds on top.
"""

from __future__ import annotations

import collections
import importlib.util
import pathlib

from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.gpu_fixtures import harness

ROOT = pathlib.Path(__file__).resolve().parents[4]
FILES = ROOT / "roles" / "nvidia_gpu" / "files"
RECORDED = pathlib.Path(__file__).resolve().parent / "recorded"


def load_program(name):
    """roles/nvidia_gpu/files/<name>.py as a module (the file the role installs)."""
    spec = importlib.util.spec_from_file_location(name, FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Event:
    def __init__(self, device, xid, event_type=8):
        self.device = device
        self.eventData = xid
        self.eventType = event_type


class GpuNVML(harness.FakeNVML):
    """FakeNVML plus the exporter's queries. Per-device keys (all optional; a missing one is NOT_SUPPORTED):
    utilization (percent), memory_used (bytes), power_usage (mW), ecc_corrected_aggregate,
    ecc_uncorrected_aggregate, retired_sbe / retired_dbe (page lists), retired_pending (0/1), remapped
    ((corr, unc, pending, failure)). ``events``: (device index, xid) the event set hands out, then timeouts."""

    NVML_AGGREGATE_ECC = 1
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, *args, events=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.events = collections.deque(events)
        self.registered = []
        self.init_depth = 0

    def nvmlInit(self):
        super().nvmlInit()
        self.init_depth += 1

    def nvmlShutdown(self):
        super().nvmlShutdown()
        self.init_depth -= 1

    def nvmlDeviceGetUtilizationRates(self, handle):
        return harness._Struct(gpu=self._value(handle, "nvmlDeviceGetUtilizationRates", "utilization"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = self._value(handle, "nvmlDeviceGetMemoryInfo", "memory_total")
        used = self.devices[handle].get("memory_used", 0)
        return harness._Struct(total=total, free=total - used, used=used)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._value(handle, "nvmlDeviceGetPowerUsage", "power_usage")

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        kind = "corrected" if error_type == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else "uncorrected"
        if counter_type == self.NVML_VOLATILE_ECC:
            return self._value(handle, "nvmlDeviceGetTotalEccErrors", f"ecc_{kind}")
        device = self._device(handle, "nvmlDeviceGetTotalEccErrors")
        if device.get(f"ecc_{kind}") is None:
            raise harness.NVMLError(3)
        return device.get(f"ecc_{kind}_aggregate", device[f"ecc_{kind}"])

    def nvmlDeviceGetRetiredPages(self, handle, cause):
        single_bit = cause == self.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        key = "retired_sbe" if single_bit else "retired_dbe"
        return list(self._value(handle, "nvmlDeviceGetRetiredPages", key))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle):
        return self._value(handle, "nvmlDeviceGetRetiredPagesPendingStatus", "retired_pending")

    def nvmlDeviceGetRemappedRows(self, handle):
        return tuple(self._value(handle, "nvmlDeviceGetRemappedRows", "remapped"))

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle, event_types, event_set):
        self.registered.append((handle, event_types, event_set))

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        if not self.events:
            raise harness.NVMLError(10)  # NVML_ERROR_TIMEOUT: nothing happened within timeout_ms
        index, xid = self.events.popleft()
        return _Event(index, xid)


def nvml_for(host_name, readings=None, events=()):
    """The double for a recorded host (gpu_fixtures/<host_name>), each GPU's dict updated from ``readings``
    ({index: {key: value}})."""
    host = harness.load_host(host_name)
    base = harness.fake_nvml_for(host)
    if base is None:
        return None
    double = GpuNVML(
        [dict(d) for d in base.devices],
        driver_version=base.driver_version,
        cuda_version=base.cuda_version,
        init_error=base.init_error,
        events=events,
    )
    for index, values in (readings or {}).items():
        double.devices[index].update(values)
    return double
