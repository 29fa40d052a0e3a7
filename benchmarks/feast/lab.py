#!/usr/bin/env python3
"""Entity-keyed inference on the running lab, through the path a client takes: the lab machine's forwarded
port -> HAProxy on the inference host -> the live color's runtime -> Feast's Redis online store on ops-01.

    make lab                                   # once: the lab must be up, churn served with its feature service
    python benchmarks/feast/lab.py             # infer-01's frontend (127.0.0.1:18000), 5 s per row
    python benchmarks/feast/lab.py --port 18001 --seconds 10 --key 1310

Two rows, each at c=1 and c=16: churn asked by ``customer_id`` (the runtime reads that customer's features from
Redis, then predicts) and churn given the same customer's feature vector (the reference: everything but the
read). One entity every request, as benchmarks/feast/bench.py does. The load generator is benchmarks/runtime's
(closed loop, HTTP/1.1 keep-alive, every request timed by the client); it is not pinned, because the lab's
containers run on every CPU of this machine. Each answer is checked once before the load starts (200, the
model's output present); non-200 answers during the load are counted in "errors". Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks" / "runtime")]

import loadgen  # noqa: E402

FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_one_year", "contract_two_year",
            "autopay", "num_products", "data_usage_gb"]  # fmt: skip


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000, help="an inference host's frontend (lab: 18000, 18001)")
    ap.add_argument("--model", default="churn")
    ap.add_argument("--key", type=int, default=1310, help="the customer_id every request asks for")
    ap.add_argument("--feast", default="http://127.0.0.1:16566", help="feast serve, to read the key's vector once")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row and concurrency")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    path = f"/v2/models/{args.model}/infer"
    url = f"http://{args.host}:{args.port}{path}"
    keyed = {"inputs": [{"name": "customer_id", "datatype": "INT64", "shape": [1], "data": [args.key]}]}
    online = post(f"{args.feast}/get-online-features",
                  {"features": [f"churn_customer_features:{f}" for f in FEATURES],
                   "entities": {"customer_id": [args.key]}})  # fmt: skip
    names = online["metadata"]["feature_names"]
    values = {n: r["values"][0] for n, r in zip(names, online["results"], strict=True)}
    vector = [float(values[f]) for f in FEATURES]
    by_vector = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 8], "data": vector}]}
    a, b = post(url, keyed), post(url, by_vector)
    if a["outputs"][0]["data"] != b["outputs"][0]["data"]:
        raise SystemExit(f"keyed and vector answers differ: {a['outputs']} vs {b['outputs']}")
    print(f"# {url}: customer_id {args.key} -> {a['outputs'][0]['data']} (model_version "
          f"{a.get('model_version')}), the same as its vector from feast serve; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'row':40} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>6}")
    out = {}
    for label, body in (("by customer_id (fetch + forward)", keyed), ("with the vector (reference)", by_vector)):
        payload = loadgen.request(args.host, args.port, path, json.dumps(body).encode())
        for c in (1, 16):
            r = loadgen.summarize([loadgen.drive(args.host, args.port, payload, c, 1.0, args.seconds, False)])
            out[f"{label} c={c}"] = r
            print(f"{label:40} {c:>3} {r['rps']:>8,.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{r['p999_ms']:>9.3f} {r['errors']:>6}  load {r['loadavg_1m']:.1f}", flush=True)  # fmt: skip
    p99 = out["by customer_id (fetch + forward) c=16"]["p99_ms"]
    print(
        f"target entity-keyed inference p99 <= 10 ms at c=16 on the lab: {p99:.3f} ms "
        f"({'met' if p99 <= 10 else 'NOT met'})"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
