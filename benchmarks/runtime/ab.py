#!/usr/bin/env python3
"""Two (or more) sovereign-runtime builds or configurations side by side, same model, same load, one run.

For before/after measurements of the server's own code on a shared, noisy machine: every variant is
started first, then all are measured in interleaved rounds (bench.py's load generator and pinning), so
background load hits them alike. Each variant is ``LABEL SRC FLAGS``: a runtime source tree (``git
archive`` of an older commit, or this checkout's ``runtime/src``) and extra ``serve`` flags. A FLAGS
token ``@binary`` drives that variant with OIP binary-tensor requests (raw FP32 input, binary output)
instead of JSON.

    mkdir -p /tmp/base && git archive main runtime/src | tar -x -C /tmp/base
    python benchmarks/runtime/ab.py --variant before /tmp/base/runtime/src "" --variant after runtime/src ""
    python benchmarks/runtime/ab.py --heavy --variant d0 runtime/src "--max-batch-delay-ms 0" \\
        --variant d1 runtime/src "--max-batch-delay-ms 1"

Prints req/s, p50, p99, p99.9, mean rows per forward, the server's CPU time per request (user + system
from /proc, over every request it answered in the rounds, warm-up included: far less sensitive to other
tenants than latency) and the 1-minute load average. Nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the model builder)
import loadgen  # noqa: E402  (the closed-loop load generator)


def oip_body(width: int) -> bytes:
    data = [round(0.01 * (i % 100), 2) for i in range(width)]
    return json.dumps(
        {"inputs": [{"name": "input__0", "shape": [1, width], "datatype": "FP32", "data": data}]}
    ).encode()


def binary_body(width: int) -> tuple[bytes, int]:
    """An OIP binary-tensor request (Triton's extension): JSON header + raw little-endian FP32 row."""
    data = [round(0.01 * (i % 100), 2) for i in range(width)]
    raw = struct.pack(f"<{width}f", *data)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input__0",
                    "shape": [1, width],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "output__0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, len(head)


def request(port: int, body: bytes, header_len: int | None) -> bytes:
    extra = f"Inference-Header-Content-Length: {header_len}\r\n" if header_len is not None else ""
    ctype = "application/octet-stream" if header_len is not None else "application/json"
    head = (
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat), robust to other tenants' load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counters(port: int) -> tuple[float, float]:
    """(forwards, rows) so far, from the server's own metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("sovereign_runtime_batch_size_count", "sovereign_runtime_batch_size_sum"):
            if line.startswith(key):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("sovereign_runtime_batch_size_count", 0.0), vals.get("sovereign_runtime_batch_size_sum", 0.0)


class Variant:
    """One running server: its samples per concurrency, rows per forward and CPU time per request."""

    def __init__(self, label: str, port: int, pid: int, payload: bytes) -> None:
        self.label, self.port, self.pid, self.payload = label, port, pid, payload
        self.samples: dict[int, list[dict]] = {}
        self.acc: dict[int, list[float]] = {}  # forwards, rows, cpu seconds

    def run(self, c: int, args: argparse.Namespace, duration: float) -> None:
        f0, r0 = batch_counters(self.port)
        cpu0 = cpu_seconds(self.pid)
        sample = loadgen.drive("127.0.0.1", self.port, self.payload, c, args.warmup, duration, args.pin)
        cpu1 = cpu_seconds(self.pid)
        f1, r1 = batch_counters(self.port)
        self.samples.setdefault(c, []).append(sample)
        acc = self.acc.setdefault(c, [0.0, 0.0, 0.0])
        acc[0] += f1 - f0
        acc[1] += r1 - r0
        acc[2] += cpu1 - cpu0

    def result(self, c: int) -> dict:
        r = loadgen.summarize(self.samples[c])
        forwards, rows, cpu = self.acc[c]
        r["mean_batch_rows"] = rows / forwards if forwards else 0.0
        # over every request answered in the rounds, warm-up included (rows = requests of one row each)
        r["server_cpu_us_per_request"] = 1e6 * cpu / rows if rows else 0.0
        return r


def start(src: str, model_dir: Path, port: int, flags: list[str], pin: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model_dir), "--model-name", "m"]
    cmd += ["--port", str(port), *flags]
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{src}: server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{src}: not ready after 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def fmt(r: dict) -> str:
    return (
        f"c={r['concurrency']:<3} {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
        f"p99.9 {r['p999_ms']:8.3f} ms  n={r['requests']:,} err={r['errors']} load {r['loadavg_1m']:.1f}  "
        f"batch {r['mean_batch_rows']:.1f}  cpu/req {r['server_cpu_us_per_request']:.0f} us"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", nargs=3, action="append", metavar=("LABEL", "SRC", "FLAGS"), required=True)
    ap.add_argument("--heavy", action="store_true", help="bench.py's heavy MLP (~2 ms forward)")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated, e.g. 1,16,64")
    ap.add_argument("--duration", type=float, default=9.0, help="measured seconds per variant and concurrency")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    work = Path(tempfile.mkdtemp(prefix="sovereign-ab-"))
    procs = []
    results: dict[str, dict] = {}
    try:
        model_dir, width, _ = bench.build_model(work, "heavy" if args.heavy else "light")
        variants = []
        for label, src, flags in args.variant:
            tokens = shlex.split(flags)
            binary = "@binary" in tokens
            tokens = [t for t in tokens if t != "@binary"]
            port = bench.free_port()
            proc = start(src, model_dir, port, tokens, args.pin, work / f"{label}.log")
            procs.append(proc)
            payload = request(port, *binary_body(width)) if binary else request(port, oip_body(width), None)
            variants.append(Variant(label, port, proc.pid, payload))
        print(f"# {os.cpu_count()} CPUs, pin={args.pin}, {args.duration}s per variant and concurrency, "
              f"{args.rounds} interleaved rounds, {'heavy' if args.heavy else 'light'} model")  # fmt: skip
        for c in (int(x) for x in args.concurrency.split(",")):
            for _ in range(args.rounds):
                for v in variants:
                    v.run(c, args, args.duration / args.rounds)
            for v in variants:
                r = results[f"{v.label} c={c}"] = v.result(c)
                print(f"{v.label:24} {fmt(r)}", flush=True)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
