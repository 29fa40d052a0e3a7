# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""sovereign GPU health gate: does every GPU of this host compute, and is it clean?

Per GPU (CUDA_DEVICE_ORDER=PCI_BUS_ID, so torch's index is NVML's and nvidia-smi's):

1. memory: allocates a share of the free memory in chunks, fills each with a pattern, reads it back;
2. compute: a timed square matmul (torch) for a few seconds; achieved TFLOPs against the expected figure for
   that model (the role's table, a tolerance per entry);
3. XID errors in this boot's kernel log (``NVRM: Xid (PCI:...): N, ...``), classified: a reset/reboot-class XID
   fails the GPU, the others are reported;
4. ECC (NVML): uncorrectable volatile errors, retired pages pending, row remapping pending or failed fail it.

Writes one JSON result (``--result``, atomically) and Prometheus text lines to the file named by
``SOVEREIGN_JOB_METRICS_FILE`` (the sovereign-job wrapper's) or ``--metrics-file``. Exit status: 0 passed (or no
GPU and none expected), 1 failed, 2 bad usage. A host without a GPU says so ("no GPU: ...") and, with
``--expected-gpus N`` (N > 0), fails: it had GPUs when it was provisioned.

The decision (judge_gpu, judge_host) is pure and unit-tested with recorded inputs; the measurement needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

RESULT_VERSION = 1

# XID classes (NVIDIA's XID catalogue, docs.nvidia.com/deploy/xid-errors): what an operator must do.
#   reset:       the GPU needs a reset or the host a reboot before it can be trusted (fails the gate);
#   restart_app: the error was contained; the application that hit it must restart (reported);
#   application: a program's own fault (bad memory access, killed context) (reported);
#   info:        a record, not a fault (63: a page retirement/row remap was recorded; 92: high corrected-ECC rate).
# Anything else is "unknown" (reported). The exporter and the alerts use the same table.
XID_RESET = frozenset({48, 61, 62, 64, 74, 79, 95, 119, 120, 140})
XID_RESTART_APP = frozenset({94})
XID_APPLICATION = frozenset({13, 31, 32, 38, 43, 45, 68, 69})
XID_INFO = frozenset({63, 92})
XID_CLASSES = ("reset", "restart_app", "application", "info", "unknown")

_XID_RE = re.compile(
    r"NVRM: Xid \(PCI:(?P<bus>[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})(?:\.\d)?\): "
    r"(?P<xid>\d+),\s*(?P<text>.*)"
)


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


def normalize_bus_id(bus_id: str) -> str:
    """``00000000:3B:00.0`` (NVML, nvidia-smi) or ``0000:3b:00`` (kernel XID line) -> ``0000:3b:00``."""
    bus_id = bus_id.strip().lower()
    parts = bus_id.split(":")
    if len(parts) == 3:
        domain, bus, rest = parts
    else:  # no domain
        domain, (bus, rest) = "0", parts[-2:]
    device = rest.split(".")[0]
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}"


def parse_xids(kernel_log: str) -> list[dict]:
    """Every XID line of a kernel log: [{bus, xid, class, text}] in log order."""
    found = []
    for line in kernel_log.splitlines():
        match = _XID_RE.search(line)
        if match:
            xid = int(match.group("xid"))
            found.append(
                dict(
                    bus=normalize_bus_id(match.group("bus")),
                    xid=xid,
                    xid_class=xid_class(xid),
                    text=match.group("text").strip()[:200],
                )
            )
    return found


def expected_for(name: str, table: list[dict]) -> dict | None:
    """The first entry of the table whose ``match`` (a regular expression, case-insensitive) finds the GPU's name."""
    for entry in table:
        if re.search(entry["match"], name or "", re.IGNORECASE):
            return entry
    return None


def judge_gpu(gpu: dict, expected: dict | None, xids: list[dict], default_tolerance: float, unknown_model: str) -> dict:
    """The verdict for one GPU from what was measured and read; pure (unit-tested with recorded inputs).

    ``gpu``: index, name, uuid, bus_id, and what was measured: ``tflops`` (None: not measured), ``dtype``,
    ``memory_error`` / ``compute_error`` (text), ``memory_tested_bytes``, ``ecc`` (dict from read_ecc or None).
    """
    reasons: list[str] = []
    warnings: list[str] = []
    label = f"GPU {gpu.get('index')} ({gpu.get('name') or 'unknown model'}, {gpu.get('bus_id') or 'bus id unknown'})"

    if gpu.get("memory_error"):
        reasons.append(f"memory test failed: {gpu['memory_error']}")
    if gpu.get("compute_error"):
        reasons.append(f"matmul failed: {gpu['compute_error']}")

    minimum = None
    tflops = gpu.get("tflops")
    if expected is None:
        text = f"no expected TFLOPs figure for '{gpu.get('name')}': add an entry to nvidia_gpu_health_expected"
        (reasons if unknown_model == "fail" else warnings).append(text)
    elif tflops is not None:
        tolerance = float(expected.get("tolerance", default_tolerance))
        minimum = float(expected["tflops"]) * (1.0 - tolerance)
        if tflops < minimum:
            reasons.append(
                f"achieved {tflops:.1f} TFLOPs ({gpu.get('dtype')}), below {minimum:.1f} "
                f"(expected {float(expected['tflops']):.1f} for '{expected['match']}' less {tolerance:.0%})"
            )

    bus = normalize_bus_id(gpu["bus_id"]) if gpu.get("bus_id") else None
    mine = [x for x in xids if bus is not None and x["bus"] == bus]
    reset = [x for x in mine if x["xid_class"] == "reset"]
    if reset:
        codes = sorted({x["xid"] for x in reset})
        reasons.append(
            f"XID {', '.join(map(str, codes))} in this boot's kernel log (reset/reboot class: "
            f"{reset[-1]['text']}); reset the GPU or reboot the host"
        )
    others = [x for x in mine if x["xid_class"] != "reset"]
    if others:
        warnings.append(
            "XID " + ", ".join(f"{x['xid']} ({x['xid_class']})" for x in others[-5:]) + " in this boot's kernel log"
        )

    ecc = gpu.get("ecc") or {}
    if ecc.get("uncorrected_volatile"):
        reasons.append(f"{ecc['uncorrected_volatile']} uncorrectable ECC errors since the driver loaded")
    if ecc.get("retired_pages_pending"):
        reasons.append("retired pages are pending: reset the GPU so they take effect")
    if ecc.get("remapped_rows_failure"):
        reasons.append("row remapping failed: the GPU needs service (RMA)")
    elif ecc.get("remapped_rows_pending"):
        reasons.append("row remapping is pending: reset the GPU so it takes effect")
    for note in ecc.get("notes", []):
        warnings.append(note)

    return dict(
        index=gpu.get("index"),
        name=gpu.get("name"),
        uuid=gpu.get("uuid"),
        bus_id=gpu.get("bus_id"),
        label=label,
        passed=not reasons,
        reasons=reasons,
        warnings=warnings,
        dtype=gpu.get("dtype"),
        tflops=None if tflops is None else round(tflops, 2),
        expected_tflops=None if expected is None else float(expected["tflops"]),
        min_tflops=None if minimum is None else round(minimum, 2),
        memory_tested_bytes=gpu.get("memory_tested_bytes", 0),
        xids=[dict(xid=x["xid"], xid_class=x["xid_class"], text=x["text"]) for x in mine],
        ecc=ecc or None,
    )


def judge_host(found: list[dict], discovery_error: str | None, expected_gpus: int, host_reasons: list[str]) -> dict:
    """Host verdict from the per-GPU verdicts: ``no_gpu``, ``pass`` or ``fail``, with every reason named."""
    reasons = list(host_reasons)
    if not found:
        why = discovery_error or "no CUDA device"
        if expected_gpus > 0:
            reasons.insert(0, f"no GPU: {why}; this host had {expected_gpus} at provisioning")
            return dict(status="fail", passed=False, reasons=reasons, summary="; ".join(reasons))
        summary = f"no GPU: {why}"
        return dict(status="no_gpu", passed=True, reasons=reasons, summary=summary)
    if expected_gpus and len(found) < expected_gpus:
        reasons.insert(0, f"{len(found)} GPUs answer, {expected_gpus} were there at provisioning")
    for gpu in found:
        reasons.extend(f"{gpu['label']}: {reason}" for reason in gpu["reasons"])
    passed = not reasons
    summary = f"{len(found)} GPUs passed" if passed else "; ".join(reasons)
    return dict(status="pass" if passed else "fail", passed=passed, reasons=reasons, summary=summary)


# ------------------------------------------------------------------------------------------------------------
# Reading the host (needs the driver; not exercised without a GPU except for the "no GPU" answers)


def nvml_devices(pynvml) -> tuple[list[dict], str | None]:
    """[{index, name, uuid, bus_id, handle}] from NVML, or ([], why)."""
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: library not found (no driver), driver not loaded, mismatch ...
        return [], f"NVML: {exc}"
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            devices.append(dict(index=index, name=None, uuid=None, bus_id=None, handle=None, error=str(exc)))
            continue
        devices.append(
            dict(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                handle=handle,
            )
        )
    return devices, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_ecc(pynvml, handle) -> dict:
    """Uncorrectable ECC and pending retirements; a GPU without the feature leaves the key out."""
    ecc: dict = {"notes": []}
    queries = {
        "uncorrected_volatile": lambda: pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
        ),
        "retired_pages_pending": lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle),
        "remapped_rows": lambda: pynvml.nvmlDeviceGetRemappedRows(handle),
    }
    for key, query in queries.items():
        try:
            value = query()
        except Exception as exc:
            if getattr(exc, "value", None) != getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                ecc["notes"].append(f"{key} not read: {exc}")
            continue
        if key == "remapped_rows":
            ecc["remapped_rows_pending"] = int(value[2])
            ecc["remapped_rows_failure"] = int(value[3])
        else:
            ecc[key] = int(value)
    return ecc


def read_kernel_log() -> tuple[str, str | None]:
    """This boot's kernel messages (journalctl -k -b, else dmesg)."""
    for argv in (["journalctl", "-k", "-b", "--no-pager", "-o", "short-monotonic"], ["dmesg"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout, None
    return "", "the kernel log could not be read (journalctl -k, dmesg): XIDs not checked"


def measure(torch, index: int, args, dtype_name: str) -> dict:
    """Memory pattern test and a timed matmul (in ``dtype_name``) on one GPU."""
    result: dict = {"dtype": dtype_name, "memory_tested_bytes": 0}
    device = torch.device("cuda", index)
    chunk = 256 * 1024 * 1024
    try:
        free, _total = torch.cuda.mem_get_info(device)
        chunks = []
        for n in range(max(1, int(free * args.memory_fraction) // chunk)):
            tensor = torch.empty(chunk, dtype=torch.uint8, device=device)
            tensor.fill_(n % 251)
            chunks.append(tensor)
        for n, tensor in enumerate(chunks):
            if not bool((tensor == n % 251).all()):
                raise RuntimeError(f"chunk {n} read back wrong (256 MiB at chunk {n} of {len(chunks)})")
        result["memory_tested_bytes"] = chunk * len(chunks)
        del chunks
        torch.cuda.empty_cache()
    except Exception as exc:
        result["memory_error"] = f"{type(exc).__name__}: {exc}"
        torch.cuda.empty_cache()
    try:
        dtype = getattr(torch, dtype_name)
        n = args.size
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _warmup in range(3):  # warm-up: cuBLAS heuristics, clocks
            torch.matmul(a, b)
        torch.cuda.synchronize(device)
        iterations, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            iterations += 1
            if iterations % 4 == 0:
                torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if elapsed >= args.seconds:
                    break
        result["tflops"] = 2.0 * n**3 * iterations / elapsed / 1e12
        result["iterations"] = iterations
        del a, b
        torch.cuda.empty_cache()
    except Exception as exc:
        result["compute_error"] = f"{type(exc).__name__}: {exc}"
    return result


def run(args) -> dict:
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    table = json.loads(read_text(args.expected)) if args.expected else []
    host_reasons: list[str] = []
    warnings: list[str] = []

    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        pynvml = None
    devices, nvml_error = [], "NVML: nvidia-ml-py (import pynvml) is not installed"
    if pynvml is not None:
        devices, nvml_error = nvml_devices(pynvml)

    try:
        import torch  # heavy; only imported here
    except ImportError as exc:
        torch, torch_note = None, f"torch is not installed ({exc})"
    else:
        torch_note = None

    cuda_count = 0
    if torch is not None:
        try:
            cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as exc:  # a broken driver can raise here
            torch_note = f"torch could not initialise CUDA: {exc}"
        if not cuda_count and torch_note is None:
            build = f"torch {torch.__version__} is a CPU build (no CUDA)"
            if torch.version.cuda:
                build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
            torch_note = f"torch sees no CUDA device ({build})"

    discovery_error = None
    if not devices and not cuda_count:
        discovery_error = "; ".join(x for x in (nvml_error, torch_note) if x)
    elif devices and not cuda_count:
        host_reasons.append(f"NVML sees {len(devices)} GPUs but {torch_note}")
    elif cuda_count and devices and cuda_count != len(devices):
        host_reasons.append(f"NVML sees {len(devices)} GPUs, torch {cuda_count}")

    kernel_log, log_note = ("", None)
    if devices or cuda_count:
        if args.kernel_log is None:
            kernel_log, log_note = read_kernel_log()
        else:
            kernel_log = read_text(args.kernel_log)
    if log_note:
        warnings.append(log_note)
    xids = parse_xids(kernel_log)

    verdicts = []
    count = max(len(devices), cuda_count)
    for index in range(count):
        device = devices[index] if index < len(devices) else dict(index=index, name=None, uuid=None, bus_id=None)
        gpu = dict(index=index, name=device.get("name"), uuid=device.get("uuid"), bus_id=device.get("bus_id"))
        if device.get("error"):
            gpu["compute_error"] = f"NVML cannot open it: {device['error']}"
        if torch is not None and index < cuda_count:
            gpu["name"] = gpu["name"] or torch.cuda.get_device_properties(index).name
        expected = expected_for(gpu["name"] or "", table)
        if torch is not None and index < cuda_count:
            # The table's dtype for this model (fp32 on Pascal, whose fp16 rate is 1/64), else --dtype.
            gpu.update(measure(torch, index, args, (expected or {}).get("dtype") or args.dtype))
        if pynvml is not None and device.get("handle") is not None:
            gpu["ecc"] = read_ecc(pynvml, device["handle"])
        verdicts.append(judge_gpu(gpu, expected, xids, args.tolerance, args.unknown_model))
    if pynvml is not None and devices:
        with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
            pynvml.nvmlShutdown()

    verdict = judge_host(verdicts, discovery_error, args.expected_gpus, host_reasons)
    return dict(
        version=RESULT_VERSION,
        host=socket.gethostname(),
        timestamp=time.time(),
        **verdict,
        gpu_count=len(verdicts),
        expected_gpus=args.expected_gpus,
        warnings=warnings,
        settings=dict(dtype=args.dtype, size=args.size, seconds=args.seconds, memory_fraction=args.memory_fraction),
        gpus=verdicts,
    )


def metric_lines(result: dict) -> list[str]:
    """Prometheus text lines (no HELP/TYPE duplicates with the wrapper's sovereign_job_* lines)."""

    def esc(value) -> str:
        return str(value if value is not None else "").replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

    lines = [
        "# HELP sovereign_gpu_health_passed 1 when the last GPU health gate run passed (host, or one GPU).",
        "# TYPE sovereign_gpu_health_passed gauge",
        f'sovereign_gpu_health_passed{{gpu="all",status="{result["status"]}"}} {int(result["passed"])}',
    ]
    for gpu in result["gpus"]:
        labels = f'gpu="{gpu["index"]}",uuid="{esc(gpu["uuid"])}",name="{esc(gpu["name"])}"'
        status = "pass" if gpu["passed"] else "fail"
        lines.append(f'sovereign_gpu_health_passed{{{labels},status="{status}"}} {int(gpu["passed"])}')
    lines += [
        "# HELP sovereign_gpu_health_gpus GPUs the last health gate run found.",
        "# TYPE sovereign_gpu_health_gpus gauge",
        f"sovereign_gpu_health_gpus {result['gpu_count']}",
        "# HELP sovereign_gpu_health_tflops Achieved matmul TFLOPs in the last health gate run.",
        "# TYPE sovereign_gpu_health_tflops gauge",
    ]
    for gpu in result["gpus"]:
        if gpu["tflops"] is not None:
            labels = f'gpu="{gpu["index"]}",uuid="{esc(gpu["uuid"])}",dtype="{esc(gpu["dtype"])}"'
            lines.append(f"sovereign_gpu_health_tflops{{{labels}}} {gpu['tflops']}")
    lines += [
        "# HELP sovereign_gpu_health_expected_tflops The TFLOPs figure the gate compares with (before tolerance).",
        "# TYPE sovereign_gpu_health_expected_tflops gauge",
    ]
    for gpu in result["gpus"]:
        if gpu["expected_tflops"] is not None:
            labels = f'gpu="{gpu["index"]}",uuid="{esc(gpu["uuid"])}"'
            lines.append(f"sovereign_gpu_health_expected_tflops{{{labels}}} {gpu['expected_tflops']}")
    return lines


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sovereign-gpu-health", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--result", required=True, help="where the JSON result goes (written atomically)")
    parser.add_argument("--expected", help="JSON table: [{match, tflops, dtype?, tolerance?}]")
    parser.add_argument("--expected-gpus", type=int, default=0, help="GPUs the host had at provisioning")
    parser.add_argument("--tolerance", type=float, default=0.25, help="default share below the expected TFLOPs")
    parser.add_argument("--unknown-model", choices=("pass", "fail"), default="pass")
    parser.add_argument(
        "--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="unless the table says"
    )
    parser.add_argument("--size", type=int, default=8192, help="matrix side of the matmul")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the timed matmul runs")
    parser.add_argument("--memory-fraction", type=float, default=0.8, help="share of free memory tested")
    parser.add_argument("--kernel-log", help="read XIDs from this file instead of journalctl -k -b")
    parser.add_argument("--metrics-file", default=os.environ.get("SOVEREIGN_JOB_METRICS_FILE"))
    args = parser.parse_args(argv)
    if not 0 < args.memory_fraction < 1 or not 0 <= args.tolerance < 1 or args.size < 64 or args.seconds <= 0:
        parser.error("need 0 < --memory-fraction < 1, 0 <= --tolerance < 1, --size >= 64, --seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_atomic(args.result, json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.metrics_file:
        existing = ""
        if os.environ.get("SOVEREIGN_JOB_METRICS_FILE") == args.metrics_file and os.path.exists(args.metrics_file):
            existing = read_text(args.metrics_file)  # the wrapper's file: append to it
        try:
            write_atomic(args.metrics_file, existing + "\n".join(metric_lines(result)) + "\n")
        except OSError as exc:  # the verdict is in the result file; metrics are a report of it
            print(f"sovereign-gpu-health: metrics not written to {args.metrics_file}: {exc}", file=sys.stderr)
    print(f"sovereign-gpu-health: {result['status']}: {result['summary']}")
    for gpu in result["gpus"]:
        print(
            f"  {gpu['label']}: {'pass' if gpu['passed'] else 'FAIL'}; {gpu['tflops']} TFLOPs {gpu['dtype']} "
            f"(minimum {gpu['min_tflops']}); {gpu['memory_tested_bytes'] // (1024 * 1024)} MiB tested"
            + "".join(f"\n    - {reason}" for reason in gpu["reasons"])
            + "".join(f"\n    ~ {warning}" for warning in gpu["warnings"])
        )
    for warning in result["warnings"]:
        print(f"  ~ {warning}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
