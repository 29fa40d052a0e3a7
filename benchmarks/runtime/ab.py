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
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the load generator, model builder and server helpers)


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


class Variant(bench.Target):
    """bench.Target plus the server's own CPU time per answered request."""

    def __init__(self, label: str, port: int, pid: int) -> None:
        super().__init__(label, port, "/v2/models/m/infer", b"", True)
        self.pid = pid
        self.cpu: dict[int, float] = {}

    def run(self, c: int, args: argparse.Namespace, duration: float) -> None:
        before = cpu_seconds(self.pid)
        super().run(c, args, duration)
        self.cpu[c] = self.cpu.get(c, 0.0) + cpu_seconds(self.pid) - before

    def result(self, c: int) -> dict:
        r = super().result(c)
        rows = self.batches[c][1]  # rows of every request the server answered in these rounds, warm-up included
        r["server_cpu_us_per_request"] = 1e6 * self.cpu[c] / rows if rows else 0.0
        return r


def start(src: str, model_dir: Path, port: int, flags: list[str], pin: bool, log: Path):
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model_dir), "--model-name", "m"]
    cmd += ["--port", str(port), *flags]
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    bench.wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


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
        model_dir, width = bench.build_model(work, args.heavy)
        targets = []
        for label, src, flags in args.variant:
            tokens = shlex.split(flags)
            binary = "@binary" in tokens
            tokens = [t for t in tokens if t != "@binary"]
            port = bench.free_port()
            proc = start(src, model_dir, port, tokens, args.pin, work / f"{label}.log")
            procs.append(proc)
            t = Variant(label, port, proc.pid)
            if binary:
                body, hlen = binary_body(width)
                t.payload = request(port, body, hlen)
            else:
                t.payload = request(port, bench.oip_body(width), None)
            targets.append(t)
        print(f"# {os.cpu_count()} CPUs, pin={args.pin}, {args.duration}s per variant and concurrency, "
              f"{args.rounds} interleaved rounds, {'heavy' if args.heavy else 'light'} model")  # fmt: skip
        for c in (int(x) for x in args.concurrency.split(",")):
            for _ in range(args.rounds):
                for t in targets:
                    t.run(c, args, args.duration / args.rounds)
            for t in targets:
                r = results[f"{t.label} c={c}"] = t.result(c)
                cpu = r["server_cpu_us_per_request"]
                print(f"{t.label:24} {bench.fmt(r)} batch {r['mean_batch_rows']:.1f} cpu/req {cpu:.0f} us", flush=True)
    finally:
        for proc in procs:
            bench.stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
