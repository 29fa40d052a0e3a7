#!/usr/bin/env python3
"""sovereign-runtime and its peers, same model, same load, one run, one machine (issue 17).

    python benchmarks/runtime/bench.py --setup                  # only install the peers' venvs (+ Java for TorchServe)
    python benchmarks/runtime/bench.py                          # every peer, light and heavy model, c=1, 16, 64
    python benchmarks/runtime/bench.py --peers mlflow,bare --models light --concurrency 1,16
    python benchmarks/runtime/bench.py --duration 3 --rounds 1 --json out.json

Servers: sovereign-runtime (README defaults, and as the role deploys it: batch delay 1 ms), a lean bare
uvicorn endpoint (the limit), KServe, LitServe, Ray Serve (proxy and replica), BentoML (with and without
adaptive batching), PyTriton, TorchServe, `mlflow models serve`; each but ours from its own pinned venv
under .cache/bench-peers/ (peers.py, requirements/), in its fast one-core configuration (printed).
Models: light = MLP 64->256->256->10, heavy = MLP 512->2048->2048->512 (~2 ms forward: batching matters).

Load generator (loadgen.py): closed loop, HTTP/1.1 keep-alive over raw sockets, every request timed by the
client with perf_counter_ns (no coordinated-omission correction), separate processes, bounded, loopback
only. With --pin (default) every server process tree runs on CPU 1 (taskset) and the load generator on
CPU 0. All servers of a model are started first and measured in interleaved rounds. Results are printed
(a markdown table with every ratio to ours), never asserted. A peer that cannot be installed, started, or
that answers wrongly is listed with the stage and the reason.

Needs: the project's .venv (torch, mlflow, the runtime; runtime/src is put first on PYTHONPATH) and the
package index for --setup. No other network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
import report

ROOT = peers.ROOT
MODELS = {"light": [64, 256, 256, 10], "heavy": [512, 2048, 2048, 512]}

# --------------------------------------------------------------------------------------------------
# The model


def build_model(workdir: Path, model: str) -> tuple[Path, int, list[float]]:
    """An MLflow model dir (MLflow's default format, torch.export) with golden.json, plus the peers' copy
    of the same weights (peer_model.json, weights.pt). Returns (dir, input width, expected output of the
    benchmark's request row)."""
    dims = MODELS[model]
    code = f"""
import json, logging, sys, warnings
logging.disable(logging.WARNING); warnings.simplefilter("ignore")
import numpy as np, torch, mlflow.pytorch
from mlflow.models import infer_signature
torch.manual_seed(0)
dims = {dims}
layers = []
for a, b in zip(dims, dims[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1]).eval()
x = np.random.default_rng(0).random((4, dims[0]), dtype=np.float32)  # batch 4: keeps the batch dim dynamic
with torch.no_grad():
    y = model(torch.from_numpy(x)).numpy()
    row = torch.tensor([json.loads(sys.argv[2])], dtype=torch.float32)
    expected = model(row)[0].tolist()
mlflow.pytorch.save_model(model, sys.argv[1], signature=infer_signature(x, y), input_example=x, pip_requirements=[])
torch.save(model.state_dict(), sys.argv[1] + "/weights.pt")
json.dump({{"dims": dims}}, open(sys.argv[1] + "/peer_model.json", "w"))
json.dump(expected, open(sys.argv[1] + "/expected.json", "w"))
t = lambda n, a: {{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}}
json.dump({{"inputs": [t("input__0", x)], "outputs": [t("output__0", y)]}}, open(sys.argv[1] + "/golden.json", "w"))
"""
    path = workdir / model
    subprocess.run([sys.executable, "-c", code, str(path), json.dumps(peers.row(dims[0]))], check=True)
    return path, dims[0], json.loads((path / "expected.json").read_text())


# --------------------------------------------------------------------------------------------------
# Starting and stopping servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(launch: peers.Launch, python: str, pin: bool, log: Path) -> subprocess.Popen:
    cmd = launch.cmd
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]  # the whole process tree (workers, Java, raylet) inherits it
    env = {**os.environ, **launch.env}
    # mlflow runs `uvicorn`, TorchServe `python`, by name: the venv's bin goes first on PATH
    env["PATH"] = str(Path(python).parent) + os.pathsep + os.environ.get("PATH", "")
    env.pop("VIRTUAL_ENV", None)
    return subprocess.Popen(
        cmd,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=launch.cwd,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def reap(work: Path) -> None:
    """SIGKILL what is left of this run's servers once all are stopped: processes whose command line or
    environment names this run's work dir (Ray's and TorchServe's helpers may leave the process group)."""
    mark = str(work).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "cmdline").read_bytes() or mark in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, PermissionError):
            continue


def tail(log: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(ln.strip()[:200] for ln in lines[-n:]) or "(empty log)"


def post(port: int, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(launch: peers.Launch, proc: subprocess.Popen, log: Path, deadline: float) -> str | None:
    """None once the ready URL answers 200 and the first target answers 200; else why not."""
    url = f"http://127.0.0.1:{launch.ready_port}{launch.ready}"
    first = launch.targets[0]
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} before it was ready: {tail(log)}"
        try:
            ready = True
            if launch.ready:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    ready = resp.status == 200
            if ready:
                status, _ = post(first.port, first.path, first.body, timeout=10)
                if status == 200:
                    return None
                last = f"ready, but infer answered {status}"
        except OSError as exc:
            last = f"{url}: {exc}"
        time.sleep(0.5)
    return f"not ready in time ({last}): {tail(log)}"


# --------------------------------------------------------------------------------------------------
# Measuring


def batch_counters(port: int) -> tuple[float, float]:
    """(forwards, rows) so far, from sovereign-runtime's own metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("sovereign_runtime_batch_size_count", "sovereign_runtime_batch_size_sum"):
            if line.startswith(key):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("sovereign_runtime_batch_size_count", 0.0), vals.get("sovereign_runtime_batch_size_sum", 0.0)


class Failures(list):
    """The run's failures, each also printed the moment it happens (a run cut short still shows them)."""

    def append(self, failure: peers.Failure) -> None:
        where = " ".join(x for x in (failure.model, failure.target) if x)
        print(f"# FAILED {failure.peer} ({where or '-'}) at {failure.stage}: {failure.reason}", flush=True)
        super().append(failure)


class Runner:
    """One target under load: its samples per concurrency (and sovereign's rows per forward)."""

    def __init__(self, target: peers.Target, peer: str) -> None:
        self.target, self.peer = target, peer
        self.payload = loadgen.request("127.0.0.1", target.port, target.path, target.body)
        self.samples: dict[int, list[dict]] = {}
        self.batches: dict[int, list[float]] = {}

    def run(self, c: int, args: argparse.Namespace, duration: float) -> None:
        t = self.target
        before = batch_counters(t.port) if t.batch_metrics else (0.0, 0.0)
        sample = loadgen.drive("127.0.0.1", t.port, self.payload, c, args.warmup, duration, args.pin)
        self.samples.setdefault(c, []).append(sample)
        if t.batch_metrics:
            after = batch_counters(t.port)
            acc = self.batches.setdefault(c, [0.0, 0.0])
            acc[0] += after[0] - before[0]
            acc[1] += after[1] - before[1]

    def result(self, c: int, model: str) -> dict:
        r = loadgen.summarize(self.samples[c])
        r.update(model=model, label=self.target.label, config=self.target.config)
        if self.target.batch_metrics and self.batches.get(c):
            forwards, rows = self.batches[c]
            r["mean_batch_rows"] = rows / forwards if forwards else 0.0
        return r


def fmt(r: dict) -> str:
    return (
        f"c={r['concurrency']:<3} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
        f"p99.9 {r['p999_ms']:8.3f} ms  n={r['requests']:,} errors={r['errors']} load {r['loadavg_1m']:.1f}"
    )


def measure_model(model: str, names: list[str], args, work: Path, failures: list) -> tuple[list[dict], list]:
    """Start every selected server for one model, check its answer, measure all in interleaved rounds."""
    model_dir, width, expected = build_model(work, model)
    started: list[tuple[str, peers.Launch, subprocess.Popen, Path]] = []
    rows: list[dict] = []
    configs: list[tuple[str, str, str]] = []
    try:
        for name in names:
            peer = peers.PEERS[name]
            python = str(peers.venv_python(name)) if peer.venv else sys.executable
            ctx = peers.Ctx(model, model_dir, width, python, work, free_port)
            try:
                launches = peer.launches(ctx)
                for launch in launches:
                    if launch.prepare:
                        launch.prepare()
                    log = work / f"{model}-{launch.name.replace(' ', '_')}.log"
                    started.append((name, launch, start(launch, python, args.pin, log), log))
            except Exception as exc:  # a peer's own setup (TorchServe's archiver) failed
                failures.append(peers.Failure(name, "start", f"{type(exc).__name__}: {exc}", model))
        deadline = time.monotonic() + args.start_timeout
        runners: list[Runner] = []
        for name, launch, proc, log in started:
            why = wait_ready(launch, proc, log, deadline)
            if why:
                failures.append(peers.Failure(name, "start", why, model, launch.name))
                stop(proc)
                continue
            ok: list[peers.Target] = []
            for t in launch.targets:
                status, raw = post(t.port, t.path, t.body)
                try:
                    wrong = (
                        f"HTTP {status}: {raw[:200]!r}"
                        if status != 200
                        else report.close_enough(t.parse(raw), expected)
                    )
                except Exception as exc:  # an answer we cannot read is a wrong answer
                    wrong = f"unreadable answer ({type(exc).__name__}: {exc}): {raw[:200]!r}"
                if wrong:
                    failures.append(peers.Failure(name, "answer", wrong, model, t.label))
                else:
                    ok.append(t)
            if launch.pick_fastest and len(ok) > 1:
                probe = {}
                for t in ok:
                    try:
                        payload = loadgen.request("127.0.0.1", t.port, t.path, t.body)
                        probe[t.label] = loadgen.summarize(
                            [loadgen.drive("127.0.0.1", t.port, payload, 1, 0.5, 2, args.pin)]
                        )
                        print(f"# probe {t.label:32} {fmt(probe[t.label])}", flush=True)
                    except Exception as exc:
                        failures.append(peers.Failure(name, "measure", f"probe: {exc}", model, t.label))
                if probe:
                    best = min(probe, key=lambda k: probe[k]["p50_ms"])
                    ok = [t for t in ok if t.label == best]
            for t in ok:
                runners.append(Runner(t, name))
                configs.append((model, t.label, t.config))
        print(f"# {model}: {len(runners)} targets ready: {', '.join(r.target.label for r in runners)}", flush=True)
        for c in args.concurrency:
            active = list(runners)
            for _ in range(args.rounds):
                for r in list(active):
                    try:
                        r.run(c, args, args.duration / args.rounds)
                    except Exception as exc:
                        failures.append(peers.Failure(r.peer, "measure", f"c={c}: {exc}", model, r.target.label))
                        active.remove(r)
            for r in active:
                res = r.result(c, model)
                rows.append(res)
                extra = f" batch {res['mean_batch_rows']:.1f}" if "mean_batch_rows" in res else ""
                print(f"{model:5} {r.target.label:30} {fmt(res)}{extra}", flush=True)
    finally:
        for _, _, proc, _ in started:
            stop(proc)
        reap(work)
        if args.keep_logs:
            # It need not exist beforehand (a missing one once ended a run after its first model).
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for _, _, _, log in started:
                shutil.copy(log, args.keep_logs / log.name)
    return rows, configs


# --------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", help=f"comma-separated subset of: {','.join(peers.PEERS)} (sovereign is always in)")
    ap.add_argument("--setup", action="store_true", help="only install the peers' venvs (and Java), then exit")
    ap.add_argument("--models", default="light,heavy", help="light (64->256->256->10), heavy (512->2048x2->512)")
    ap.add_argument("--concurrency", type=_ints, default=[1, 16, 64], help="closed-loop connections, e.g. 1,16,64")
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per server and concurrency")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="servers CPU 1, load CPU 0")
    ap.add_argument("--ours", default="sovereign", help="the row every ratio is to (default: README defaults)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for all servers to get ready")
    ap.add_argument("--json", type=Path, help="also write rows, configurations, failures and versions here")
    ap.add_argument("--keep-logs", type=Path, help="copy every server's log into this directory")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        ap.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    args.models = models
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a SIGTERM (timeout, kill) still stops every server this run started: finally blocks run on SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = peers.select(args.peers)
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    failures: list[peers.Failure] = Failures()
    if "torchserve" in names and args.setup:
        print(f"# {peers.ensure_java()}", flush=True)
    installed = []
    for name in names:
        failure = peers.install(name)
        if failure:
            failures.append(failure)
            print(f"# {name}: NOT INSTALLED: {failure.reason}", flush=True)
        else:
            installed.append(name)
    versions = {name: peers.versions(name) for name in installed}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {now} {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name in names:
        print(f"# {name:10} " + (", ".join(f"{k} {v}" for k, v in versions.get(name, {}).items()) or "—"))
    if args.setup:
        print(report.failures_table(failures))
        return 1 if failures else 0
    pin = "servers CPU 1, load generator CPU 0" if args.pin else "off"
    print(f"# pin={pin}; {args.duration}s per server and concurrency in {args.rounds} interleaved rounds, "
          f"{args.warmup}s warm-up each; c={args.concurrency}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="sovereign-bench-"))
    rows: list[dict] = []
    configs: list[tuple[str, str, str]] = []
    try:
        for model in args.models:
            r, c = measure_model(model, installed, args, work, failures)
            rows += r
            configs += c
    finally:
        reap(work)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(report.configs_table(configs))
    print()
    print(report.table(rows, args.ours))
    print()
    print(report.failures_table(failures))
    if args.json:
        doc = {
            "date": now,
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": versions,
            "rows": report.with_ratios(rows, args.ours),
            "configs": configs,
            "failures": [vars(f) for f in failures],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
