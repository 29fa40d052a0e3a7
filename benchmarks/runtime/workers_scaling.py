#!/usr/bin/env python3
"""``sovereign-runtime serve --workers N`` scaling (issue 17, docs/adr/1710): the light model, the same closed-loop
keep-alive load as bench.py (loadgen.py), each server configuration pinned with taskset to a CPU set.

    python benchmarks/runtime/workers_scaling.py                       # 1@1, 1@0-1, 2@0-1; c=16,64 (2-core machine)
    python benchmarks/runtime/workers_scaling.py --configs 1@2,2@2-3,4@2-5,8@2-9 --loadgen-cpus 10-15 \
        --concurrency 16,64,128                                        # a 16-core machine

A configuration is ``WORKERS@CPUS`` (taskset's list syntax). Every server is started first, then all are measured in
interleaved rounds (drift on a shared machine hits each alike). The load generator's processes are pinned to
``--loadgen-cpus`` (one CPU each, round robin; default CPU 0) - on a machine with fewer cores than workers plus
generator the servers share CPUs with it, which the output says. Printed: req/s, p50/p99/p99.9, the ratio to the
first configuration and the issue's target (N workers on N free cores >= 0.8 x N x one worker), the 1-minute load
average before and after. Results are printed, never asserted; docs/benchmarks.md records runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peers
from bench import free_port

ROOT = peers.ROOT
LIGHT = [64, 256, 256, 10]


def cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def build_model(work: Path) -> Path:
    """The light MLP as TorchScript with its golden pair (no MLflow needed: runs on a bare torch machine too)."""
    code = f"""
import json, sys, torch
torch.manual_seed(0)
dims = {LIGHT}
layers = []
for a, b in zip(dims, dims[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1]).eval()
x = torch.rand(4, dims[0])
with torch.no_grad():
    y = model(x)
torch.jit.save(torch.jit.trace(model, x), sys.argv[1])
t = lambda n, a: {{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}}
golden = {{"inputs": [t("input__0", x)], "outputs": [t("output__0", y)], "rtol": 1e-4, "atol": 1e-5}}
json.dump(golden, open(sys.argv[1] + ".golden.json", "w"))
"""
    path = work / "light.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def start(model: Path, workers: int, cpus: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model), "--model-name", "m",
           "--port", str(port), "--workers", str(workers), *extra]  # fmt: skip
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]  # the supervisor's children inherit the CPU set
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOVEREIGN_RUNTIME_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "runtime" / "src"), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)  # fmt: skip


def wait_ready(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not ready in time")


def infer_counts(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("sovereign_runtime_requests_total{") and 'endpoint="infer",code="200"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1@1,1@0-1,2@0-1", help="WORKERS@CPUS,...; the first is the baseline")
    ap.add_argument("--concurrency", default="16,64", help="closed-loop connections, e.g. 16,64")
    ap.add_argument("--loadgen-cpus", default="0", help="CPUs of the load generator's processes")
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per configuration and c")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round")
    ap.add_argument("--extra", default="", help="more serve flags for every server, e.g. '--max-batch-delay-ms 0'")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    configs = [(int(w), cpus) for w, cpus in (c.split("@") for c in args.configs.split(","))]
    conc = [int(c) for c in args.concurrency.split(",")]
    gen_cpus = cpu_list(args.loadgen_cpus)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="workers-scaling-"))
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        model = build_model(work)
        ports = []
        for i, (w, cpus) in enumerate(configs):
            ports.append(bench_port := free_port())
            procs.append(start(model, w, cpus, bench_port, work / f"server-{i}.log", args.extra.split()))
        deadline = time.monotonic() + 300
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc, deadline)
        samples: dict[tuple[int, int], list[dict]] = {}
        for _ in range(args.rounds):
            for c in conc:
                for i, port in enumerate(ports):
                    body = loadgen.request("127.0.0.1", port, "/v2/models/m/infer", peers.oip_body(LIGHT[0]))
                    samples.setdefault((i, c), []).append(
                        loadgen.drive(
                            "127.0.0.1", port, body, c, args.warmup, args.duration / args.rounds, False, cpus=gen_cpus
                        )
                    )
        served = [infer_counts(port) for port in ports]
        for c in conc:
            base = None
            for i, (w, cpus) in enumerate(configs):
                r = loadgen.summarize(samples[(i, c)])
                base = base or r["rps"]
                n_cpus = len(cpu_list(cpus))
                shared = sorted(set(cpu_list(cpus)) & set(gen_cpus))
                row = {"workers": w, "cpus": cpus, "c": c}
                row.update({k: r[k] for k in ("rps", "p50_ms", "p99_ms", "p999_ms", "errors", "requests")})
                row["ratio"] = r["rps"] / base
                row["target"] = 0.8 * n_cpus if w == n_cpus and w > 1 else None
                row["cpus_shared_with_loadgen"] = shared
                row["infer_200_on_metrics"] = served[i]
                rows.append(row)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs; loadavg 1m before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"load generator on CPUs {args.loadgen_cpus}; {args.rounds} rounds x {args.duration / args.rounds:.1f} s "
          f"(+{args.warmup} s warm-up) per row; serve flags: defaults {args.extra}")  # fmt: skip
    print("| workers | CPUs | c | req/s | p50 ms | p99 ms | p99.9 ms | vs first | target 0.8·N | CPUs shared w/ load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = f"{r['target']:.1f}" if r["target"] else "-"
        shared = ",".join(map(str, r["cpus_shared_with_loadgen"])) or "none"
        print(f"| {r['workers']} | {r['cpus']} | {r['c']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['p999_ms']:.2f} | {r['ratio']:.2f}x | {target} | {shared} |")  # fmt: skip
    errors = sum(r["errors"] for r in rows)
    print(f"errors (non-200): {errors}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
