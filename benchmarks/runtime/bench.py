#!/usr/bin/env python3
"""sovereign-runtime vs `mlflow models serve`, same model, same load, one run. Prints p50/p99/req/s and ratios.

    python benchmarks/runtime/bench.py            # MLP 64->256->256->10: mlflow vs sovereign, c=1 and c=16
    python benchmarks/runtime/bench.py --heavy    # a model with a >=1 ms forward: batching on vs off

Load generator: closed loop (each connection sends its next request when the previous answer is in),
HTTP/1.1 keep-alive over raw sockets, every request timed here with perf_counter_ns (no coordinated-
omission correction: the numbers are what each client saw). It runs in separate processes (2 for
c=16, each driving 8 connections from a selector loop), bounded by time and request count, loopback
only. With --pin (default) the server runs on CPU 1 and the load generator on CPU 0 (taskset /
sched_setaffinity), so the two do not fight over the same core; --no-pin leaves scheduling to Linux.

Needs: the runtime package installed (or runtime/src on PYTHONPATH), mlflow, torch. No network.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------------
# Load generator


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    __slots__ = ("buf", "need", "sock", "start", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.need = -1  # total bytes of the response once headers are parsed
        self.start = 0
        self.status = 0

    def feed(self, data: bytes) -> bool:
        """True when a whole response is in."""
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            self.buf = self.buf[self.need :]
            self.need = -1
            return True
        return False


def _worker(host, port, payload, conns, warmup, duration, max_requests, cpu, ready, go, results) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sel = selectors.DefaultSelector()
    pool = []
    for _ in range(conns):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        pool.append(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
    ready.release()
    go.wait()
    clock = time.perf_counter_ns
    t_begin = clock()
    t_measure = t_begin + int(warmup * 1e9)
    t_end = t_measure + int(duration * 1e9)
    lat: list[int] = []
    errors = 0
    sent = 0
    for conn in pool:
        conn.start = clock()
        conn.sock.sendall(payload)
        sent += 1
    open_conns = len(pool)
    while open_conns:
        for key, _ in sel.select(timeout=5.0):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("server closed the connection")
            if not conn.feed(data):
                continue
            now = clock()
            if conn.start >= t_measure:
                lat.append(now - conn.start)
                if conn.status != 200:
                    errors += 1
            if now >= t_end or len(lat) >= max_requests:
                sel.unregister(conn.sock)
                conn.sock.close()
                open_conns -= 1
                continue
            conn.start = clock()
            conn.sock.sendall(payload)
            sent += 1
    window = (min(clock(), t_end) - t_measure) / 1e9
    results.put({"lat": lat, "errors": errors, "window": window})


def drive(host, port, payload, concurrency, warmup, duration, pin, max_requests=2_000_000) -> dict:
    ctx = mp.get_context("spawn")
    procs_n = 1 if concurrency < 4 else 2
    per = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                host,
                port,
                payload,
                n,
                warmup,
                duration,
                max_requests // procs_n,
                0 if pin else None,
                ready,
                go,
                results,
            ),
        )
        for n in per
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    out = [results.get(timeout=warmup + duration + 60) for _ in procs]
    for p in procs:
        p.join()
    return {
        "lat": [x for r in out for x in r["lat"]],
        "window": max(r["window"] for r in out),
        "errors": sum(r["errors"] for r in out),
        "concurrency": concurrency,
    }


def summarize(samples: list[dict]) -> dict:
    """Merge the rounds of one (server, concurrency): percentiles over all samples, rate over all windows."""
    lat = sorted(x for s in samples for x in s["lat"])
    if not lat:
        raise SystemExit("no request completed")

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6

    return {
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine during the run
        "concurrency": samples[0]["concurrency"],
        "rounds": len(samples),
        "requests": len(lat),
        "errors": sum(s["errors"] for s in samples),
        "rps": len(lat) / sum(s["window"] for s in samples),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "mean_ms": statistics.fmean(lat) / 1e6,
        "round_p50_ms": [sorted(s["lat"])[len(s["lat"]) // 2] / 1e6 for s in samples if s["lat"]],
    }


# --------------------------------------------------------------------------------------------------
# Models and servers


def build_model(workdir: Path, heavy: bool) -> tuple[Path, int]:
    """An MLflow model dir (MLflow's default format, torch.export) plus golden.json. Returns (dir, width)."""
    code = f"""
import json, logging, sys, warnings
logging.disable(logging.WARNING); warnings.simplefilter("ignore")
import numpy as np, torch, mlflow.pytorch
from mlflow.models import infer_signature
torch.manual_seed(0)
dims = {[512, 2048, 2048, 512] if heavy else [64, 256, 256, 10]}
layers = []
for a, b in zip(dims, dims[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1]).eval()
x = np.random.default_rng(0).random((4, dims[0]), dtype=np.float32)  # batch 4: keeps the batch dim dynamic
with torch.no_grad():
    y = model(torch.from_numpy(x)).numpy()
mlflow.pytorch.save_model(model, sys.argv[1], signature=infer_signature(x, y), input_example=x, pip_requirements=[])
t = lambda n, a: {{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}}
json.dump({{"inputs": [t("input__0", x)], "outputs": [t("output__0", y)]}}, open(sys.argv[1] + "/golden.json", "w"))
"""
    path = workdir / ("heavy" if heavy else "mlp")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path, 512 if heavy else 64


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


def start(cmd: list[str], pin: bool, log: Path) -> subprocess.Popen:
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = {
        **os.environ,
        # mlflow runs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT / "runtime" / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
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


def sovereign(model_dir: Path, port: int, pin: bool, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model_dir), "--model-name", "m"]
    proc = start([*cmd, "--port", str(port), *extra], pin, log)
    wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def batch_counters(port: int) -> tuple[float, float]:
    """(forwards, rows) so far, from the server's own metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("sovereign_runtime_batch_size_count", "sovereign_runtime_batch_size_sum"):
            if line.startswith(key):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("sovereign_runtime_batch_size_count", 0.0), vals.get("sovereign_runtime_batch_size_sum", 0.0)


class Target:
    """One running server and the request it is driven with."""

    def __init__(self, label: str, port: int, path: str, body: bytes, sovereign: bool) -> None:
        self.label, self.port, self.sovereign = label, port, sovereign
        self.payload = _request("127.0.0.1", port, path, body)
        self.samples: dict[int, list[dict]] = {}
        self.batches: dict[int, list[float]] = {}

    def run(self, c: int, args: argparse.Namespace, duration: float) -> None:
        before = batch_counters(self.port) if self.sovereign else (0.0, 0.0)
        sample = drive("127.0.0.1", self.port, self.payload, c, args.warmup, duration, args.pin)
        self.samples.setdefault(c, []).append(sample)
        if self.sovereign:
            after = batch_counters(self.port)
            acc = self.batches.setdefault(c, [0.0, 0.0])
            acc[0] += after[0] - before[0]
            acc[1] += after[1] - before[1]

    def result(self, c: int) -> dict:
        r = summarize(self.samples[c])
        if self.sovereign:
            forwards, rows = self.batches[c]
            r["mean_batch_rows"] = rows / forwards if forwards else 0.0
        return r


def interleave(targets: list[Target], concurrencies: dict[str, tuple[int, ...]], args) -> dict[str, dict]:
    """Round-robin short runs across the servers, so drifting background load hits them all alike."""
    results = {}
    for c in (1, 16):
        active = [t for t in targets if c in concurrencies[t.label]]
        for _ in range(args.rounds):
            for t in active:
                t.run(c, args, args.duration / args.rounds)
        for t in active:
            r = results[f"{t.label} c={c}"] = t.result(c)
            extra = f" batch {r['mean_batch_rows']:.1f}" if "mean_batch_rows" in r else ""
            print(f"{t.label:34} {fmt(r)}{extra}", flush=True)
    return results


def oip_body(width: int) -> bytes:
    data = [round(0.01 * (i % 100), 2) for i in range(width)]
    return json.dumps(
        {"inputs": [{"name": "input__0", "shape": [1, width], "datatype": "FP32", "data": data}]}
    ).encode()


def mlflow_bodies(width: int) -> dict[str, bytes]:
    row = [round(0.01 * (i % 100), 2) for i in range(width)]
    return {
        "inputs": json.dumps({"inputs": [row]}).encode(),
        "dataframe_split": json.dumps({"dataframe_split": {"columns": list(range(width)), "data": [row]}}).encode(),
    }


# --------------------------------------------------------------------------------------------------


def fmt(r: dict) -> str:
    return (
        f"c={r['concurrency']:<3} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
        f"p99.9 {r['p999_ms']:7.3f} ms  n={r['requests']:,} errors={r['errors']} load {r['loadavg_1m']:.1f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heavy", action="store_true", help="model with a >=1 ms forward: batching on vs off")
    ap.add_argument("--duration", type=float, default=9.0, help="measured seconds per server and concurrency")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="server CPU 1, load CPU 0")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    work = Path(tempfile.mkdtemp(prefix="sovereign-bench-"))
    procs: list[subprocess.Popen] = []
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# pin={'server CPU 1, load generator CPU 0' if args.pin else 'off'} {args.duration}s per server and "
          f"concurrency in {args.rounds} interleaved rounds, {args.warmup}s warm-up each")  # fmt: skip
    try:
        model_dir, width = build_model(work, args.heavy)
        targets: list[Target] = []
        conc: dict[str, tuple[int, ...]] = {}
        if args.heavy:
            configs = [
                ("sovereign batching on (max 16)", ["--max-batch-size", "16"]),
                ("sovereign batching on +2ms delay", ["--max-batch-size", "16", "--max-batch-delay-ms", "2"]),
                ("sovereign batching off", ["--max-batch-size", "1"]),
            ]
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
            proc = start([*cmd, "-h", "127.0.0.1", "-p", str(port)], args.pin, work / "mlflow.log")
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/ping", proc)
            probe = {}
            for name, body in mlflow_bodies(width).items():
                sample = drive(
                    "127.0.0.1", port, _request("127.0.0.1", port, "/invocations", body), 1, 0.5, 2, args.pin
                )
                probe[name] = summarize([sample])
                print(f"mlflow probe {name:21} {fmt(probe[name])}", flush=True)
            ok = {k: v for k, v in probe.items() if v["errors"] == 0}
            best = min(ok or probe, key=lambda k: probe[k]["p50_ms"])
            targets.append(Target(f"mlflow ({best})", port, "/invocations", mlflow_bodies(width)[best], False))
            conc[targets[-1].label] = (1, 16)
            configs = [("sovereign", []), ("sovereign batching off", ["--max-batch-size", "1"])]
        for label, extra in configs:
            port = free_port()
            procs.append(sovereign(model_dir, port, args.pin, work / f"sovereign-{port}.log", *extra))
            targets.append(Target(label, port, "/v2/models/m/infer", oip_body(width), True))
            conc[label] = (1,) if label == "sovereign batching off" and not args.heavy else (1, 16)
        results = interleave(targets, conc, args)
        print()
        if args.heavy:
            on, off = results["sovereign batching on (max 16) c=16"], results["sovereign batching off c=16"]
            lone_on, lone_off = results["sovereign batching on (max 16) c=1"], results["sovereign batching off c=1"]
            ratio, p99 = on["rps"] / off["rps"], on["p99_ms"] / off["p99_ms"]
            print(f"c=16 batching on/off: throughput x{ratio:.2f}, p99 x{p99:.2f}")
            print(f"c=1  batching on/off: p50 x{lone_on['p50_ms'] / lone_off['p50_ms']:.3f}")
        else:
            mlf = targets[0].label
            m1, m16 = results[f"{mlf} c=1"], results[f"{mlf} c=16"]
            s1, s16 = results["sovereign c=1"], results["sovereign c=16"]
            off1 = results["sovereign batching off c=1"]
            print(f"c=16 throughput  sovereign/mlflow x{s16['rps'] / m16['rps']:.1f}   (target >= 5)")
            print(f"c=16 p99         sovereign/mlflow  {s16['p99_ms'] / m16['p99_ms']:.3f}  (target <= 0.1)")
            print(f"c=1  p50         sovereign {s1['p50_ms']:.3f} ms  (target <= 0.3 ms); mlflow {m1['p50_ms']:.3f} ms")
            print(f"c=1  p50         batching on/off x{s1['p50_ms'] / off1['p50_ms']:.3f} (target <= 1.10)")
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
