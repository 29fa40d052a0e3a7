"""The runtime's own per-request CPU cost, in process: App + Engine answering one OIP infer request, no
sockets and no load generator (bench.py measures those). CPU time (``process_time``) per request, best of
7 blocks of 5,000, for the inline path (a lone request) and the batching hop (queued, one-request
batches). CPU time and best-of-blocks make it far less sensitive to other tenants than bench.py's
latencies, which is what a before/after comparison of the server's code needs on a shared machine.

    python benchmarks/runtime/hotpath.py                                  # this checkout
    python benchmarks/runtime/hotpath.py --src /tmp/old/runtime/src --src runtime/src --rounds 2

Each ``--src`` is a runtime source tree (e.g. ``git archive`` of an older commit); they are measured in
interleaved rounds on the same model (bench.py's MLP 64->256->256->10, torch.export).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def measure(model_dir: str) -> dict[str, float]:
    import warnings

    warnings.simplefilter("ignore")
    import gc

    import torch
    from sovereign_runtime.app import App
    from sovereign_runtime.config import Settings
    from sovereign_runtime.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(Settings(model_uri=model_dir, model_name="m"))
    try:
        from sovereign_runtime.startup import prepare
    except ImportError:  # runtime trees before startup.py existed
        report = engine.prepare()
    else:
        report = prepare(engine)
    assert report["ok"], report
    engine.set_ready()
    app = App(engine)
    golden = json.loads((Path(model_dir) / "golden.json").read_text())
    first = golden["inputs"][0]
    width = first["shape"][1]
    row = {**first, "shape": [1, width], "data": first["data"][:width]}
    body = json.dumps({"inputs": [row]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer"}
    scope["headers"] = [(b"content-length", str(len(body)).encode())]
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: set[int] = set()

    async def receive() -> dict:
        return message

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            statuses.add(msg["status"])

    async def block(n: int) -> None:
        for _ in range(n):
            await app(scope, receive, send)

    async def run() -> dict[str, float]:
        out = {}
        for mode, busy in (("inline_us", lambda: 1), ("queued_us", None)):
            engine.busy = busy  # 1 = alone (inline); None = unknown (always through the batch queue)
            await block(2000)
            best = float("inf")
            for _ in range(7):
                t = time.process_time()
                await block(5000)
                best = min(best, (time.process_time() - t) / 5000)
            out[mode] = round(best * 1e6, 1)
        return out

    gc.collect()
    gc.freeze()  # as the server does once ready
    result = asyncio.run(run())
    assert statuses == {200}, statuses
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", help="runtime source tree (default: this checkout's runtime/src)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    sys.path.insert(0, str(HERE))
    from bench import build_model

    sources = [str(Path(s).resolve()) for s in (args.src or [ROOT / "runtime" / "src"])]
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        model_dir, _, _ = build_model(Path(tmp), "light")
        for r in range(1, args.rounds + 1):
            for src in sources:
                env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
                cmd = [sys.executable, __file__, "--measure", str(model_dir)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                load = os.getloadavg()[0]
                print(f"round {r}  {src}  inline {res['inline_us']} us  queued {res['queued_us']} us  load {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
