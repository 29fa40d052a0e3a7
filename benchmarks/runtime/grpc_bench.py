#!/usr/bin/env python3
"""sovereign-runtime over gRPC against itself over HTTP JSON: one server process, both ports, same model (issue 17).

    python benchmarks/runtime/grpc_bench.py                      # light model, c=1 and 16, 3 rounds of 5 s
    python benchmarks/runtime/grpc_bench.py --no-pin --concurrency 1,16,64 --models light,heavy --json out.json

One `sovereign-runtime serve --grpc-port` as the role deploys it (batch delay 1 ms, max batch 16, 1 torch thread),
measured in interleaved rounds through:

* ``http-json``: OIP v2 JSON over HTTP/1.1 keep-alive (loadgen.py: raw sockets, closed loop);
* ``grpc-raw``: ModelInfer with ``raw_input_contents`` (what tritonclient sends; the answer comes raw);
* ``grpc-typed``: ModelInfer with ``contents.fp32_contents`` (the answer comes typed).

gRPC load: closed loop, grpcio's asyncio client on uvloop with the request serialized once (bytes in, bytes
out: the client does no protobuf work per call), one channel (one HTTP/2 connection) per load process, 1 process
for c < 4 else 2, every call timed with perf_counter_ns. A Python gRPC client costs far more CPU per call than
the raw-socket HTTP generator, so besides req/s the table gives the SERVER's CPU per request (utime + stime of
the server process over the measured window, /proc): that is the protocol's cost, whatever the client's.
With --pin (default) the server runs on CPU 1 and the load on CPU 0. Results are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import loadgen
import peers

ROOT = peers.ROOT
SRC = ROOT / "runtime" / "src"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICKS = os.sysconf("SC_CLK_TCK")


def grpc_payloads(width: int) -> dict[str, bytes]:
    sys.path.insert(0, str(SRC))
    from sovereign_runtime.oip_grpc import oip_v2_pb2 as pb

    values = peers.row(width)
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="input__0", datatype="FP32", shape=[1, width])
    import struct

    raw.raw_input_contents.append(struct.pack(f"<{width}f", *values))
    typed = pb.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="input__0", datatype="FP32", shape=[1, width])
    tensor.contents.fp32_contents.extend(values)
    return {"grpc-raw": raw.SerializeToString(), "grpc-typed": typed.SerializeToString()}


def check_grpc(target: str, payload: bytes, expected: list[float]) -> None:
    """The server's answer to the benchmark's row, through each gRPC form, equals the model's (else no figures)."""
    import grpc

    sys.path.insert(0, str(SRC))
    from sovereign_runtime.oip_grpc import oip_v2_pb2 as pb

    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(METHOD)(payload, timeout=30)
    response = pb.ModelInferResponse.FromString(raw)
    if response.raw_output_contents:
        import struct

        data = list(struct.unpack(f"<{len(expected)}f", response.raw_output_contents[0]))
    else:
        data = list(response.outputs[0].contents.fp32_contents)
    if any(abs(a - b) > 1e-4 + 1e-4 * abs(b) for a, b in zip(data, expected, strict=True)):
        raise SystemExit(f"gRPC answer differs from the model's: {data[:4]}... vs {expected[:4]}...")


def _grpc_worker(target, payload, conns, warmup, duration, cpu, ready, go, results) -> None:
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        import asyncio

        import grpc
        import uvloop

        async def main() -> dict:
            async with grpc.aio.insecure_channel(target) as channel:
                call = channel.unary_unary(METHOD)  # bytes in, bytes out
                await call(payload, timeout=30)  # connected, warm
                ready.release()
                await asyncio.to_thread(go.wait)
                clock = time.perf_counter_ns
                t_measure = clock() + int(warmup * 1e9)
                t_end = t_measure + int(duration * 1e9)
                lat: list[int] = []
                errors = [0]

                async def client() -> None:
                    while True:
                        start = clock()
                        try:
                            await call(payload, timeout=30)
                            failed = False
                        except grpc.RpcError:
                            failed = True
                        now = clock()
                        if start >= t_measure:
                            lat.append(now - start)
                            errors[0] += failed
                        if now >= t_end:
                            return

                await asyncio.gather(*(client() for _ in range(conns)))
                window = (min(clock(), t_end) - t_measure) / 1e9
                return {"lat": lat, "errors": errors[0], "window": window}

        results.put(uvloop.run(main()))
    except Exception as exc:
        ready.release()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def drive_grpc(target: str, payload: bytes, concurrency: int, warmup: float, duration: float, pin: bool) -> dict:
    ctx = mp.get_context("spawn")
    procs_n = 1 if concurrency < 4 else 2
    per = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_grpc_worker, args=(target, payload, n, warmup, duration, 0 if pin else None, ready, go, results)
        )
        for n in per
    ]
    return loadgen.gather(procs, ready, go, results, warmup + duration, concurrency, "gRPC load")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def measure(model: str, args: argparse.Namespace, work: Path) -> list[dict]:
    path, width, expected = bench.build_model(work, model)
    http_port, grpc_port = bench.free_port(), bench.free_port()
    cmd = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(path), "--model-name", "m"]
    cmd += ["--port", str(http_port), "--grpc-port", str(grpc_port), "--max-batch-delay-ms", str(args.batch_delay_ms)]
    if args.pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    log = work / f"server-{model}.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server not ready: {bench.tail(log)}")
            time.sleep(0.5)
        target = f"127.0.0.1:{grpc_port}"
        http_body = peers.oip_body(width)
        status, answer = bench.post(http_port, "/v2/models/m/infer", http_body)
        got = json.loads(answer)["outputs"][0]["data"]
        if status != 200 or any(abs(a - b) > 1e-4 + 1e-4 * abs(b) for a, b in zip(got, expected, strict=True)):
            raise SystemExit(f"HTTP answer differs from the model's: {status} {answer[:200]!r}")
        payloads = grpc_payloads(width)
        for p in payloads.values():
            check_grpc(target, p, expected)
        http_payload = loadgen.request("127.0.0.1", http_port, "/v2/models/m/infer", http_body)
        forms = ["http-json", *[f for f in ("grpc-raw", "grpc-typed") if f in args.forms]]
        samples: dict[tuple[str, int], list[dict]] = {}
        extra: dict[tuple[str, int], list[float]] = {}  # cpu seconds, forwards, rows
        for _ in range(args.rounds):
            for c in args.concurrency:
                for form in forms:
                    cpu0, (f0, r0) = cpu_seconds(proc.pid), bench.batch_counters(http_port)
                    if form == "http-json":
                        s = loadgen.drive("127.0.0.1", http_port, http_payload, c, args.warmup, args.duration, args.pin)
                    else:
                        s = drive_grpc(target, payloads[form], c, args.warmup, args.duration, args.pin)
                    cpu1, (f1, r1) = cpu_seconds(proc.pid), bench.batch_counters(http_port)
                    samples.setdefault((form, c), []).append(s)
                    acc = extra.setdefault((form, c), [0.0, 0.0, 0.0, 0])
                    acc[0] += cpu1 - cpu0  # includes the warm-up's share: per request below uses every request served
                    acc[1] += f1 - f0
                    acc[2] += r1 - r0
        rows = []
        for (form, c), ss in samples.items():
            r = loadgen.summarize(ss)
            cpu, forwards, batch_rows, _ = extra[(form, c)]
            r.update(model=model, form=form)
            r["server_cpu_us_per_req"] = 1e6 * cpu / batch_rows if batch_rows else 0.0
            r["mean_batch_rows"] = batch_rows / forwards if forwards else 0.0
            rows.append(r)
        return rows
    finally:
        bench.stop(proc)


def table(rows: list[dict]) -> str:
    base = {(r["model"], r["concurrency"]): r["rps"] for r in rows if r["form"] == "http-json"}
    lines = [
        "| model | c | form | req/s | vs http-json | p50 ms | p99 ms | p99.9 ms | server CPU µs/req | rows/forward"
        " | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["concurrency"], r["form"])):
        ratio = r["rps"] / base[(r["model"], r["concurrency"])]
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {r['form']} | {r['rps']:,.0f} | {ratio:.2f}x | {r['p50_ms']:.3f} |"
            f" {r['p99_ms']:.3f} | {r['p999_ms']:.3f} | {r['server_cpu_us_per_req']:.0f} | {r['mean_batch_rows']:.1f} |"
            f" {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="light", help="light,heavy")
    ap.add_argument("--concurrency", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--forms", default="grpc-raw,grpc-typed", help="gRPC forms besides http-json")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-delay-ms", type=float, default=1.0, help="as roles/inference_runtime deploys it")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import grpc

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, grpcio {grpc.__version__},"
        f" pin={args.pin}, {args.rounds} x {args.duration:g} s per cell, batch delay {args.batch_delay_ms:g} ms",
        flush=True,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        for model in args.models.split(","):
            rows += measure(model, args, Path(tmp))
    print(table(rows))
    print(f"# load after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
