# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""sovereign GPU exporter: per-GPU NVML readings for Prometheus (nvidia-ml-py + prometheus-client).

A background thread reads NVML every ``--interval`` seconds (a wedged driver blocks that thread, not the
scrape: the exporter keeps answering with the last readings and ``sovereign_gpu_exporter_last_collect_*``
shows how old they are). A second thread waits on an NVML event set for XID critical errors and counts them
per GPU, XID and class (``sovereign_gpu_xid_errors_total``): a counter that only grows, so alerts use
``increase()`` over a window (DCGM's XID field is the last value and never resets). XIDs from before the
exporter started are in the kernel log, which the health gate reads.

Without a driver (NVML cannot start) it serves ``sovereign_gpu_exporter_nvml_up 0`` with the reason and
``sovereign_gpu_count 0``, so GPUMissing fires on a host that had GPUs at provisioning
(``--expected-gpus``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import sys
import threading
import time

LOG = logging.getLogger("sovereign-gpu-exporter")

# The same classes as the health gate (sovereign_gpu_health.py); the alerts key on the label.
XID_RESET = frozenset({48, 61, 62, 64, 74, 79, 95, 119, 120, 140})
XID_RESTART_APP = frozenset({94})
XID_APPLICATION = frozenset({13, 31, 32, 38, 43, 45, 68, 69})
XID_INFO = frozenset({63, 92})


def xid_class(xid: int) -> str:
    if xid in XID_RESET:
        return "reset"
    if xid in XID_RESTART_APP:
        return "restart_app"
    if xid in XID_APPLICATION:
        return "application"
    if xid in XID_INFO:
        return "info"
    return "unknown"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Snapshot:
    """One collection: ``gpus`` [{index, uuid, name, bus_id, values {metric: [(labels, value)]}}]."""

    def __init__(self, nvml_up=False, error="", driver_version="", gpus=None, duration=0.0, timestamp=0.0):
        self.nvml_up = nvml_up
        self.error = error
        self.driver_version = driver_version
        self.gpus = gpus or []
        self.duration = duration
        self.timestamp = timestamp


def read_gpu(pynvml, index: int) -> dict:
    """Every reading of one GPU; a value the GPU does not support (NVML_ERROR_NOT_SUPPORTED) is left out."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    gpu = dict(
        index=index,
        handle=handle,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        values={},
        errors=[],
    )
    values = gpu["values"]
    not_supported = getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3)

    def read(metric, query, convert=lambda v: [((), float(v))]):
        try:
            values[metric] = convert(query())
        except Exception as exc:
            if getattr(exc, "value", None) != not_supported:
                gpu["errors"].append(f"{metric}: {exc}")

    read("utilization_ratio", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, lambda v: [((), v / 100.0)])
    memory = {}

    def memory_info():
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        memory.update(used=info.used, total=info.total)
        return info

    read("memory_used_bytes", memory_info, lambda info: [((), float(info.used))])
    if "total" in memory:
        values["memory_total_bytes"] = [((), float(memory["total"]))]
    read(
        "temperature_celsius",
        lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
    )
    read("power_watts", lambda: pynvml.nvmlDeviceGetPowerUsage(handle), lambda v: [((), v / 1000.0)])
    read("power_limit_watts", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle), lambda v: [((), v / 1000.0)])

    ecc = []
    for error_type, type_name in (
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
    ):
        for counter_type, counter_name in (
            (pynvml.NVML_VOLATILE_ECC, "volatile"),
            (pynvml.NVML_AGGREGATE_ECC, "aggregate"),
        ):
            try:
                count = pynvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type)
            except Exception as exc:
                if getattr(exc, "value", None) != not_supported:
                    gpu["errors"].append(f"ecc_errors {type_name} {counter_name}: {exc}")
                continue
            ecc.append(((("type", type_name), ("counter", counter_name)), float(count)))
    if ecc:
        values["ecc_errors"] = ecc

    retired = []
    for cause, cause_name in (
        (pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, "single_bit"),
        (pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR, "double_bit"),
    ):
        try:
            retired.append(((("cause", cause_name),), float(len(pynvml.nvmlDeviceGetRetiredPages(handle, cause)))))
        except Exception as exc:
            if getattr(exc, "value", None) != not_supported:
                gpu["errors"].append(f"retired_pages {cause_name}: {exc}")
    if retired:
        values["retired_pages"] = retired
    read("retired_pages_pending", lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))

    remapped = {}

    def remapped_rows():
        corr, unc, pending, failure = pynvml.nvmlDeviceGetRemappedRows(handle)
        remapped.update(pending=pending, failure=failure)
        return corr, unc

    read(
        "remapped_rows",
        remapped_rows,
        lambda v: [((("type", "correctable"),), float(v[0])), ((("type", "uncorrectable"),), float(v[1]))],
    )
    if remapped:
        values["remapped_rows_pending"] = [((), float(remapped["pending"]))]
        values["remapped_rows_failure"] = [((), float(remapped["failure"]))]
    return gpu


def collect(pynvml) -> Snapshot:
    """One pass over every GPU. NVML is initialised once per pass (cheap) so a driver reload is picked up."""
    start = time.monotonic()
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return Snapshot(nvml_up=False, error=f"NVML: {exc}", duration=time.monotonic() - start, timestamp=time.time())
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                gpus.append(read_gpu(pynvml, index))
            except Exception as exc:  # the handle cannot be opened: the GPU is lost; it is not counted
                LOG.warning("GPU %s does not answer: %s", index, exc)
        return Snapshot(True, "", driver, gpus, time.monotonic() - start, time.time())
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            LOG.debug("nvmlShutdown: %s", exc)


class XidWatcher:
    """Counts XID critical error events per (gpu, uuid, xid, class). NVML event sets are per process."""

    def __init__(self, pynvml, wait_ms=5000):
        self.pynvml = pynvml
        self.wait_ms = wait_ms
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self.error = ""
        self.running = False

    def register(self):
        """Creates the event set and registers every GPU; returns {handle value: (index, uuid)}."""
        pynvml = self.pynvml
        pynvml.nvmlInit()
        event_set = pynvml.nvmlEventSetCreate()
        by_handle = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
            by_handle[_handle_key(handle)] = (str(index), uuid)
            for xid_cls in ("reset", "restart_app", "application", "info", "unknown"):
                # Every class at 0 from the start: increase() needs a sample before the first event.
                self.counts.setdefault((str(index), uuid, "", xid_cls), 0)
        return event_set, by_handle

    def wait_once(self, event_set, by_handle) -> bool:
        """Waits up to wait_ms for one event and counts it; False on timeout."""
        pynvml = self.pynvml
        try:
            data = pynvml.nvmlEventSetWait_v2(event_set, self.wait_ms)
        except Exception as exc:
            if getattr(exc, "value", None) == getattr(pynvml, "NVML_ERROR_TIMEOUT", 10):
                return False
            raise
        if not data.eventType & pynvml.nvmlEventTypeXidCriticalError:
            return True
        index, uuid = by_handle.get(_handle_key(data.device), ("unknown", ""))
        xid = int(data.eventData)
        key = (index, uuid, str(xid), xid_class(xid))
        self.counts[key] = self.counts.get(key, 0) + 1
        LOG.warning("XID %s (%s) on GPU %s %s", xid, xid_class(xid), index, uuid)
        return True

    def run_forever(self):
        try:
            event_set, by_handle = self.register()
        except Exception as exc:
            self.error = f"XID events not watched: {exc}"
            LOG.warning("%s", self.error)
            return
        self.running = True
        while True:
            try:
                self.wait_once(event_set, by_handle)
            except Exception as exc:
                self.error = f"XID event wait failed: {exc}"
                self.running = False
                LOG.warning("%s", self.error)
                return


def _handle_key(handle):
    """A hashable identity for an NVML device handle (ctypes pointers compare by address)."""
    if isinstance(handle, (int, str)):
        return handle
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


class Collector:
    """prometheus_client custom collector over the last snapshot and the XID counts."""

    def __init__(self, state, expected_gpus: int):
        self.state = state
        self.expected_gpus = expected_gpus

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap: Snapshot = self.state["snapshot"]
        watcher: XidWatcher | None = self.state.get("watcher")

        def gauge(name, doc, labels=()):
            return GaugeMetricFamily("sovereign_gpu_" + name, doc, labels=list(labels))

        up = gauge("exporter_nvml_up", "1 when NVML answered in the last collection", ["error"])
        up.add_metric([snap.error], 1.0 if snap.nvml_up else 0.0)
        yield up
        last = gauge("exporter_last_collect_timestamp_seconds", "When the last NVML collection finished")
        last.add_metric([], snap.timestamp)
        yield last
        duration = gauge("exporter_collect_duration_seconds", "How long the last NVML collection took")
        duration.add_metric([], snap.duration)
        yield duration
        count = gauge("count", "GPUs NVML answered for in the last collection (a lost GPU is not counted)")
        count.add_metric([], float(len(snap.gpus)))
        yield count
        expected = gauge("expected_count", "GPUs this host had at provisioning (gpu_facts, the host contract)")
        expected.add_metric([], float(self.expected_gpus))
        yield expected

        info = gauge("info", "One per GPU: its identity", ["gpu", "uuid", "name", "bus_id", "driver_version"])
        for gpu in snap.gpus:
            info.add_metric([str(gpu["index"]), gpu["uuid"], gpu["name"], gpu["bus_id"], snap.driver_version], 1.0)
        yield info

        docs = {
            "utilization_ratio": "Share of the last sample period a kernel ran on the GPU (0-1)",
            "memory_used_bytes": "Framebuffer memory in use",
            "memory_total_bytes": "Framebuffer memory in total",
            "temperature_celsius": "GPU core temperature",
            "power_watts": "Power draw",
            "power_limit_watts": "Power limit in force",
            "ecc_errors": "ECC errors: volatile since the driver loaded, aggregate over the GPU's life",
            "retired_pages": "Framebuffer pages retired, by cause (pre-Ampere)",
            "retired_pages_pending": "1 when retired pages wait for a GPU reset",
            "remapped_rows": "Rows remapped, by type (Ampere and later)",
            "remapped_rows_pending": "1 when a row remap waits for a GPU reset",
            "remapped_rows_failure": "1 when a row remap failed (the GPU needs service)",
        }
        for metric, doc in docs.items():
            extra = []
            for gpu in snap.gpus:
                for labels, _value in gpu["values"].get(metric, []):
                    extra = [key for key, _unused in labels]
                    break
                if extra:
                    break
            family = gauge(metric, doc, ["gpu", "uuid", *extra])
            for gpu in snap.gpus:
                for labels, value in gpu["values"].get(metric, []):
                    family.add_metric([str(gpu["index"]), gpu["uuid"], *(v for _key, v in labels)], value)
            yield family

        xids = CounterMetricFamily(
            "sovereign_gpu_xid_errors",
            "XID critical error events since the exporter started, by XID and class",
            labels=["gpu", "uuid", "xid", "class"],
        )
        watching = gauge("exporter_xid_watch_up", "1 while XID events are being watched", ["error"])
        if watcher is not None:
            for (index, uuid, xid, xid_cls), value in sorted(watcher.counts.items()):
                xids.add_metric([index, uuid, xid, xid_cls], float(value))
            watching.add_metric([watcher.error], 1.0 if watcher.running else 0.0)
        else:
            watching.add_metric(["not started"], 0.0)
        yield xids
        yield watching


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sovereign-gpu-exporter", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9835)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between NVML collections")
    parser.add_argument("--expected-gpus", type=int, default=0, help="GPUs the host had at provisioning")
    parser.add_argument("--no-xid-events", action="store_true", help="do not watch NVML XID events")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def load_pynvml():
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        sys.exit(f"sovereign-gpu-exporter: nvidia-ml-py (import pynvml) is not installed: {exc}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s")
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    pynvml = load_pynvml()
    state = {"snapshot": collect(pynvml)}
    if not state["snapshot"].nvml_up:
        LOG.warning("%s; serving nvml_up 0 and retrying every %ss", state["snapshot"].error, args.interval)
    REGISTRY.register(Collector(state, args.expected_gpus))

    def loop():
        while True:
            time.sleep(args.interval)
            state["snapshot"] = collect(pynvml)

    threading.Thread(target=loop, name="collect", daemon=True).start()
    if not args.no_xid_events and state["snapshot"].nvml_up:
        watcher = XidWatcher(pynvml)
        state["watcher"] = watcher
        threading.Thread(target=watcher.run_forever, name="xid", daemon=True).start()
    start_http_server(args.port, addr=args.listen_address)
    LOG.info("listening on %s:%s", args.listen_address, args.port)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
