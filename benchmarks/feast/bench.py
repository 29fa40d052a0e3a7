#!/usr/bin/env python3
"""Online features for one entity, side by side in one run: Feast's SDK alone, the runtime's own read path alone,
`feast serve`'s /get-online-features, and the runtime's entity-keyed inference (fetch + forward) over HTTP.

    python benchmarks/feast/bench.py               # 5 s per measurement, c=1 and c=16
    python benchmarks/feast/bench.py --seconds 10  # longer
    python benchmarks/feast/bench.py --compare main --runtime-only  # before/after: runtime rows for both sources

``--compare REF`` (repeatable) also serves the runtime of git REF (``git archive REF runtime/src``, the same venv)
and measures its HTTP rows in the same run, right before this checkout's: before/after on the same machine at
the same moment. ``--runtime-only`` skips the Feast SDK and ``feast serve`` rows.

Everything is real and on loopback: Debian's redis-server on a free port (password, no persistence), a Feast repo
shaped like the churn example (entity customer_id, 8 features, 10,000 customers) applied to a file registry and
materialized into that Redis, `feast serve` (2 workers, --max-requests 0: no worker recycling, ARCHITECTURE §10),
`sovereign-runtime serve --feature-service` with an MLP 8->32->16->1 (TorchScript, golden check by entity key).

In-process rows (SDK, runtime read path): closed loop in this process, every call timed with perf_counter_ns; at
c=16, 16 threads share the GIL (what 16 concurrent callers of one Python process get). HTTP rows: the load
generator of benchmarks/runtime/bench.py (raw keep-alive sockets, separate processes, every request timed by
the client, no coordinated-omission correction), the same single entity every request; with --pin (default) the
server on CPU 1 and the load generator on CPU 0. Bounded by time; loopback only. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/runtime/loadgen.py, the runtime benchmark's load generator (importable by name: its spawned workers
# import it again), tests/unit/feast_testrepo.py's Redis and Feast helpers.
sys.path[:0] = [str(ROOT / "benchmarks" / "runtime"), str(ROOT / "runtime" / "src"), str(ROOT / "tests" / "unit")]

import loadgen  # noqa: E402
from feast_testrepo import RedisServer, apply_and_materialize, feature_store_yaml  # noqa: E402

N_ENTITIES = 10_000
KEY = 4242  # the single entity every request asks for
FETCH_ROW = "runtime fetch: FeatureSource.fetch (in-process)"
KEYED_ROW = "sovereign-runtime infer by customer_id (HTTP: fetch + forward)"
FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_one_year", "contract_two_year",
            "autopay", "num_products", "data_usage_gb"]  # fmt: skip


# Process helpers (what benchmarks/runtime/bench.py had before its peers rework moved them away).
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready after {timeout}s")


def start(cmd: list[str], pin: bool, log: Path, src: Path = ROOT / "runtime" / "src") -> subprocess.Popen:
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sovereign(
    model_dir: Path, port: int, pin: bool, log: Path, *extra: str, src: Path | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model_dir), "--model-name", "m"]
    proc = start([*cmd, "--port", str(port), *extra], pin, log, *([src] if src else []))
    wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def runtime_at(ref: str, work: Path) -> tuple[str, Path]:
    """(label, runtime/src directory) of git REF, extracted with git archive."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    dest = work / f"src-{sha}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "runtime/src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return (ref if ref == sha else f"{ref} {sha}"), dest / "runtime" / "src"  # a sha given as REF: once


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def build_repo(work: Path, redis: RedisServer) -> tuple[Path, list]:
    import numpy as np
    import pandas as pd
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float32

    repo = work / "repo"
    repo.mkdir()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"customer_id": np.arange(1, N_ENTITIES + 1, dtype=np.int64)})
    frame["event_timestamp"] = pd.Timestamp("2026-11-01T00:00:00+00:00")
    for name in FEATURES:
        frame[name] = rng.random(N_ENTITIES, dtype=np.float32)
    frame.to_parquet(repo / "customers.parquet", index=False)
    (repo / "feature_store.yaml").write_text(feature_store_yaml("bench", redis, work / "registry.db"))
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(name="customers", path=str(repo / "customers.parquet"), timestamp_field="event_timestamp")
    view = FeatureView(name="churn_customer_features", entities=[customer], ttl=None, source=source, online=True,
                       schema=[Field(name=n, dtype=Float32) for n in FEATURES])  # fmt: skip
    definitions = [customer, source, view, FeatureService(name="churn", features=[view])]
    apply_and_materialize(repo, definitions)
    return repo, frame.loc[frame.customer_id == KEY, FEATURES].to_numpy(np.float32)


def build_model(work: Path, row) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    ).eval()
    path = work / "churn.ts"
    torch.jit.script(model).save(str(path))
    x = torch.tensor(row)
    with torch.no_grad():
        y = model(x)

    def t(name, a):
        return {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}

    golden = {"inputs": [t("input__0", x)], "outputs": [t("output__0", y)],
              "entity_inputs": [{"name": "customer_id", "datatype": "INT64", "shape": [1], "data": [KEY]}]}  # fmt: skip
    Path(f"{path}.golden.json").write_text(json.dumps(golden))
    return path


def in_process(call, concurrency: int, seconds: float, warmup: float = 1.0) -> dict:
    """Closed loop of ``call()`` in ``concurrency`` threads of this process; per-call latencies."""
    lat: list[list[int]] = [[] for _ in range(concurrency)]
    stop_at = [0.0]
    start = threading.Barrier(concurrency + 1)

    def loop(out: list[int]) -> None:
        start.wait()
        end_warm = time.monotonic() + warmup
        while time.monotonic() < end_warm:
            call()
        while time.monotonic() < stop_at[0]:
            t0 = time.perf_counter_ns()
            call()
            out.append(time.perf_counter_ns() - t0)

    threads = [threading.Thread(target=loop, args=(lat[i],), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    stop_at[0] = time.monotonic() + warmup + seconds
    start.wait()
    for th in threads:
        th.join()
    return {"lat": [x for part in lat for x in part], "window": seconds, "errors": 0, "concurrency": concurrency}


def show(label: str, by_c: dict[int, dict]) -> None:
    for c, r in by_c.items():
        print(f"{label:66} {c:>3} {r['rps']:>8,.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['p999_ms']:>9.3f} {r['errors']:>6}  load {r['loadavg_1m']:.1f}", flush=True)  # fmt: skip


def http_rows(port: int, path: str, body: bytes, seconds: float, pin: bool) -> dict[int, dict]:
    payload = loadgen.request("127.0.0.1", port, path, body)
    return {c: loadgen.summarize([loadgen.drive("127.0.0.1", port, payload, c, 1.0, seconds, pin)]) for c in (1, 16)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row and concurrency")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="no taskset for servers and load generator")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REF",
        help="also measure the runtime rows for the runtime of git REF (before/after in one run)",
    )
    ap.add_argument("--runtime-only", action="store_true", help="skip the Feast SDK and feast serve rows")
    args = ap.parse_args()

    import feast
    import redis as redis_py
    import torch
    from sovereign_runtime.features import FeatureSource

    class Results(dict):  # prints each row as it is measured (a long run keeps what it got)
        def __setitem__(self, key: str, value: dict[int, dict]) -> None:
            super().__setitem__(key, value)
            show(key, value)

    results: dict[str, dict[int, dict]] = Results()
    stats: dict[str, tuple[str, float, float, float]] = {}  # variant -> (keyed row, requests, reads, mean s)
    with tempfile.TemporaryDirectory(prefix="feast-bench-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis").start()
        procs = []
        try:
            repo, row = build_repo(work, redis)
            model = build_model(work, row)

            # 1. Feast's SDK alone: get_online_features with the feature service, to_dict() (what a caller uses).
            if not args.runtime_only:
                store = feast.FeatureStore(repo_path=str(repo))
                service = store.get_feature_service("churn")
                sdk = lambda: store.get_online_features(features=service, entity_rows=[{"customer_id": KEY}]).to_dict()  # noqa: E731
                sdk()
                results["Feast SDK get_online_features (in-process)"] = {
                    c: loadgen.summarize([in_process(sdk, c, args.seconds)]) for c in (1, 16)
                }
            # 2. The runtime's read path alone: FeatureSource.fetch, one online_read, straight into a tensor; and
            # the read a coalesced group of 16 requests shares (16 keys, one online_read, one Redis pipeline).
            source = FeatureSource("churn", str(repo))
            source.open()
            fetch = lambda: source.fetch([KEY], torch.float32)  # noqa: E731
            assert torch.allclose(fetch(), torch.tensor(row))
            results[FETCH_ROW] = {c: loadgen.summarize([in_process(fetch, c, args.seconds)]) for c in (1, 16)}
            fetch16 = lambda: source.fetch([KEY] * 16, torch.float32)  # noqa: E731
            results["runtime fetch: FeatureSource.fetch of 16 keys, one read (in-process)"] = {
                1: loadgen.summarize([in_process(fetch16, 1, args.seconds)])
            }
            # 3. feast serve, /get-online-features alone.
            if not args.runtime_only:
                port = free_port()
                cmd = [str(Path(sys.executable).parent / "feast"), "-c", str(repo), "serve", "-h", "127.0.0.1", "-p",
                       str(port), "--no-access-log", "-w", "2", "--max-requests", "0"]  # fmt: skip
                procs.append(start(cmd, args.pin, work / "feast-serve.log"))
                deadline = time.monotonic() + 120
                while True:
                    try:
                        wait_http(f"http://127.0.0.1:{port}/health", procs[-1], timeout=5)
                        break
                    except SystemExit:
                        if time.monotonic() > deadline:
                            raise
                body = json.dumps({"feature_service": "churn", "entities": {"customer_id": [KEY]}}).encode()
                results["feast serve /get-online-features (HTTP, 2 workers)"] = http_rows(
                    port, "/get-online-features", body, args.seconds, args.pin
                )
                stop(procs.pop())
            # 4. The runtime: entity-keyed inference (fetch + batching + forward) and, for reference, the vector;
            # first for each --compare REF, then for this checkout.
            keyed = json.dumps({"inputs": [{"name": "customer_id", "datatype": "INT64", "shape": [1], "data": [KEY]}]})
            vector = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 8],
                                             "data": [float(v) for v in row.reshape(-1)]}]})  # fmt: skip
            extra = ("--feature-service", "churn", "--feast-repo", str(repo))
            variants = [runtime_at(ref, work) for ref in args.compare] + [("this checkout", ROOT / "runtime" / "src")]
            for label, src in variants:
                port = free_port()
                procs.append(sovereign(model, port, args.pin, work / f"runtime-{len(procs)}.log", *extra, src=src))
                keyed_row = f"{KEYED_ROW} [{label}]"
                results[keyed_row] = http_rows(port, "/v2/models/m/infer", keyed.encode(), args.seconds, args.pin)
                results[f"sovereign-runtime infer with the vector (HTTP, reference) [{label}]"] = http_rows(
                    port, "/v2/models/m/infer", vector.encode(), args.seconds, args.pin
                )
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                name = "sovereign_runtime_feature_"
                fetched = metric_sum(text, name + "fetches_total")
                reads = metric_sum(text, name + "store_reads_total")
                mean = metric_sum(text, name + "fetch_duration_seconds_sum") / max(1.0, fetched)
                stats[label] = (keyed_row, fetched, reads, mean)
                stop(procs.pop())
        finally:
            for proc in procs:
                stop(proc)
            redis.stop()

    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load average now {os.getloadavg()}")
    print(f"feast {feast.__version__}, redis-py {redis_py.__version__}, torch {torch.__version__}, pin={args.pin}")
    print(f"{'path':66} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>6}")
    for label, by_c in results.items():
        show(label, by_c)
    for label, (_, fetched, reads, mean) in stats.items():
        per_read = f"{fetched / reads:.2f} requests per online read" if reads else "online reads not counted"
        print(f"[{label}] the runtime's own fetch histogram: {fetched:.0f} keyed requests, mean wait for features "
              f"{1000 * mean:.3f} ms; {per_read}")  # fmt: skip
    fetch_p99 = results[FETCH_ROW][1]["p99_ms"]
    print(f"target fetch p99 <= 2 ms at c=1: {fetch_p99:.3f} ms ({'met' if fetch_p99 <= 2 else 'NOT met'})")
    for label, (keyed_row, *_) in stats.items():
        keyed_p99 = results[keyed_row][16]["p99_ms"]
        print(f"[{label}] target entity-keyed inference p99 <= 10 ms at c=16: {keyed_p99:.3f} ms "
              f"({'met' if keyed_p99 <= 10 else 'NOT met'})")  # fmt: skip
    if args.json:
        clean = {k: {c: {x: y for x, y in r.items() if x != "round_p50_ms"} for c, r in v.items()}
                 for k, v in results.items()}  # fmt: skip
        args.json.write_text(json.dumps(clean, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
