#!/usr/bin/env python3
"""What request ids and A/B experiment recording cost on the hot path (docs/adr/1420): three variants, one model.

    python benchmarks/runtime/experiment_cost.py [--before main] [--rounds 3]       # CPU per request, in process
    python benchmarks/runtime/experiment_cost.py --e2e [--duration 9] [--json out.json]   # servers under load

Default: hotpath.py's method (App + Engine in process, CPU time per request, best of 7 blocks of 5,000, inline
path), each variant in its own process, interleaved rounds. CPU time counts every thread of the process, so
``recording`` includes its writer thread's SQLite inserts. ``--e2e``: real servers under bench.py's load generator
(latencies; noisy on a shared machine).

* ``before``: the runtime as it is at git revision ``--before`` (default ``main``; extracted to a temporary
  directory), so without request ids.
* ``ids``: this checkout, no ``--experiment-dir``: request ids only.
* ``recording``: this checkout with ``--experiment-dir`` and an experiment.json: every answer queued for SQLite.

Same load generator, model, pinning and interleaved rounds as bench.py (imported from it); results are printed,
never asserted. After the run, the recording server's row count is checked against the requests it answered.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


def extract(rev: str, dest: Path) -> Path:
    git = ["git", "-C", str(bench.ROOT), "archive", rev, "runtime/src"]
    archive = subprocess.run(git, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "runtime" / "src"


def server(model: Path, port: int, pin: bool, log: Path, src: Path | None, *extra: str) -> subprocess.Popen:
    base = [sys.executable, "-m", "sovereign_runtime"]
    if src is not None:  # another revision's code first on the path
        boot = f"import sys; sys.path.insert(0, {str(src)!r}); from sovereign_runtime.cli import main; sys.exit(main())"
        base = [sys.executable, "-c", boot]
    cmd = [*base, "serve", "--model-uri", str(model), "--model-name", "m", "--port", str(port), *extra]
    proc = bench.start(cmd, pin, log)
    bench.wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def measure(model_dir: str, record: str) -> dict[str, float]:
    """In-process CPU microseconds per answered request (the inline path), like hotpath.py."""
    import asyncio
    import gc
    import warnings

    warnings.simplefilter("ignore")
    import torch
    from sovereign_runtime.app import App
    from sovereign_runtime.config import Settings
    from sovereign_runtime.engine import Engine
    from sovereign_runtime.startup import prepare

    torch.set_num_threads(1)
    engine = Engine(Settings(model_uri=model_dir, model_name="m", color="blue"))
    assert prepare(engine)["ok"]
    engine.set_ready()
    engine.busy = lambda: 1
    app = App(engine)
    store = None
    if record:
        from sovereign_runtime.experiment import install

        store = install(app, "blue", record)
        while store.active is None:
            time.sleep(0.05)
    golden = json.loads((Path(model_dir) / "golden.json").read_text())
    first = golden["inputs"][0]
    width = first["shape"][1]
    body = json.dumps({"inputs": [{**first, "shape": [1, width], "data": first["data"][:width]}]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer"}
    scope["headers"] = [(b"content-length", str(len(body)).encode())]
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        return message

    async def send(msg: dict) -> None:
        pass

    async def block(n: int) -> None:
        for _ in range(n):
            await app(scope, receive, send)
            await asyncio.sleep(0)  # a real loop iterates between requests: the writer thread gets the GIL

    async def run() -> float:
        await block(2000)
        best = float("inf")
        for _ in range(7):
            t = time.process_time()
            await block(5000)
            if store is not None:
                while store.rows:  # the writer's inserts of this block count too
                    await asyncio.sleep(0.01)
            best = min(best, (time.process_time() - t) / 5000)
        return round(best * 1e6, 2)

    gc.collect()
    gc.freeze()
    us = asyncio.run(run())
    rows = store.requests if store else 0
    if store:
        store.stop()
    return {"us": us, "rows": rows}


def in_process(args: argparse.Namespace, work: Path, model: Path, old: Path, state: Path) -> dict:
    variants = [(f"before ({args.before})", old, ""), ("ids", bench.ROOT / "runtime" / "src", ""),
                ("recording", bench.ROOT / "runtime" / "src", str(state))]  # fmt: skip
    results: dict[str, list[float]] = {}
    for r in range(1, args.rounds + 1):
        for label, src, record in variants:
            env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            cmd = [sys.executable, __file__, "--measure", str(model), "--record", record]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results.setdefault(label, []).append(res["us"])
            print(f"round {r}  {label:14} {res['us']:7.2f} us CPU/request  rows {res['rows']:,}  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    best = {k: min(v) for k, v in results.items()}
    base = best[f"before ({args.before})"]
    for label in ("ids", "recording"):
        print(f"{label:10} best {best[label]:.2f} us vs {base:.2f} us before: {best[label] - base:+.2f} us "
              f"(x{best[label] / base:.3f})")  # fmt: skip
    return {"best_us": best, "rounds_us": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="main", help="git revision of the baseline runtime")
    ap.add_argument("--duration", type=float, default=9.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--e2e", action="store_true", help="real servers under load instead of CPU per request")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one in-process measurement
    ap.add_argument("--record", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.record)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="sovereign-expbench-"))
    procs: list[subprocess.Popen] = []
    try:
        model, width = bench.build_model(work, False)
        old = extract(args.before, work)
        state = work / "state"
        state.mkdir()
        (state / "experiment.json").write_text(json.dumps({"name": "bench", "started": time.time()}))
        if not args.e2e:
            results = in_process(args, work, model, old, state)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
            return 0
        configs = [
            (f"before ({args.before})", old, []),
            ("ids", None, []),
            ("recording", None, ["--experiment-dir", str(state)]),
        ]
        targets = []
        for label, src, extra in configs:
            port = bench.free_port()
            procs.append(server(model, port, args.pin, work / f"{port}.log", src, *extra))
            targets.append(bench.Target(label, port, "/v2/models/m/infer", bench.oip_body(width), True))
        results = bench.interleave(targets, {t.label: (1, 16) for t in targets}, args)
        for label in ("ids", "recording"):
            for c in (1, 16):
                r, b = results[f"{label} c={c}"], results[f"before ({args.before}) c={c}"]
                print(f"{label:10} c={c:<3} req/s x{r['rps'] / b['rps']:.3f}  p50 x{r['p50_ms'] / b['p50_ms']:.3f}  "
                      f"p99 x{r['p99_ms'] / b['p99_ms']:.3f}  vs before")  # fmt: skip
        bench.stop(procs[-1])
        rows = sqlite3.connect(state / "experiments.sqlite").execute("SELECT count(*) FROM assignments").fetchone()[0]
        size = (state / "experiments.sqlite").stat().st_size
        print(f"recording: {rows:,} rows in experiments.sqlite ({size:,} bytes)")
        results["recorded_rows"] = rows
    finally:
        for proc in procs:
            bench.stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
