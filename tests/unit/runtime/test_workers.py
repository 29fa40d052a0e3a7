"""``serve --workers N`` (workers.py, docs/adr/1710): a real supervisor with two real worker processes on one
free loopback port; the worker plan (GPU pinning) and the metrics merge as plain functions.

No GPU here: the CUDA path is exercised by the plan (``CUDA_VISIBLE_DEVICES`` / the driver's GPU directory, faked
by a temporary directory with N entries) and by the real server started with ``CUDA_VISIBLE_DEVICES=7,9``, whose
workers each get one of them (a CPU torch then serves on the CPU, as ``--device auto`` does without CUDA).
Every wait is on a condition with a generous bound; nothing asserts a duration."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import IN, http, infer_body, runtime_command, runtime_env, wait_until
from mlflow_testserver import free_port
from sovereign_runtime import workers
from sovereign_runtime.config import Settings, parse
from sovereign_runtime.engine import Engine

# ------------------------------------------------------------------------------------------------- plan


def test_plan_cpu_one_per_core_and_no_pinning(tmp_path):
    assert workers.plan(3, "cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}) == [{}, {}, {}]
    auto = workers.plan(0, "auto", {}, gpu_dir=str(tmp_path / "absent"))  # no NVIDIA driver: one per CPU
    assert auto == [{}] * workers.cpu_count()
    assert workers.plan(0, "cpu", {}) == [{}] * workers.cpu_count()


def test_plan_cuda_one_worker_per_gpu_each_pinned(tmp_path):
    gpus = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (gpus / bus).mkdir(parents=True)
    pins = [{"CUDA_VISIBLE_DEVICES": i} for i in ("0", "1", "2")]
    assert workers.plan(0, "auto", {}, gpu_dir=str(gpus)) == pins
    assert workers.plan(0, "cuda", {}, gpu_dir=str(gpus)) == pins
    # CUDA_VISIBLE_DEVICES (the role writes it: the color's GPUs) beats the driver's list; UUIDs pass through
    assert workers.plan(0, "cuda", {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}, gpu_dir=str(gpus)) == [
        {"CUDA_VISIBLE_DEVICES": "GPU-a"},
        {"CUDA_VISIBLE_DEVICES": "GPU-b"},
    ]
    # more workers than GPUs: round robin; CUDA stops at an invalid entry (-1)
    assert [o["CUDA_VISIBLE_DEVICES"] for o in workers.plan(5, "cuda", {"CUDA_VISIBLE_DEVICES": "4,6,-1,7"})] == [
        "4", "6", "4", "6", "4",
    ]  # fmt: skip
    assert workers.plan(0, "auto", {"CUDA_VISIBLE_DEVICES": ""}) == [{}] * workers.cpu_count()


def test_workers_flag_and_env():
    assert parse(["serve", "--model-uri", "m"], {})[1].workers == 1
    assert parse(["serve", "--model-uri", "m"], {"SOVEREIGN_RUNTIME_WORKERS": "4"})[1].workers == 4
    assert parse(["serve", "--model-uri", "m", "--workers", "0"], {"SOVEREIGN_RUNTIME_WORKERS": "4"})[1].workers == 0
    with pytest.raises(SystemExit):
        parse(["serve", "--model-uri", "m"], {"SOVEREIGN_RUNTIME_WORKERS": "-1"})


def test_merge_sums_counters_histograms_and_gauges_min_max_where_a_sum_is_wrong():
    def text(requests: int, ready: float, bucket: int, start: float) -> str:
        return (
            "# HELP sovereign_runtime_requests_total Requests\n# TYPE sovereign_runtime_requests_total counter\n"
            f'sovereign_runtime_requests_total{{model="m",endpoint="infer",code="200"}} {requests}\n'
            "# HELP sovereign_runtime_request_duration_seconds Latency\n"
            "# TYPE sovereign_runtime_request_duration_seconds histogram\n"
            f'sovereign_runtime_request_duration_seconds_bucket{{model="m",le="0.001"}} {bucket}\n'
            f'sovereign_runtime_request_duration_seconds_bucket{{model="m",le="+Inf"}} {bucket + 1}\n'
            f'sovereign_runtime_request_duration_seconds_count{{model="m"}} {bucket + 1}\n'
            f'sovereign_runtime_request_duration_seconds_sum{{model="m"}} 0.5\n'
            "# HELP sovereign_runtime_ready Ready\n# TYPE sovereign_runtime_ready gauge\n"
            f"sovereign_runtime_ready {ready}\n"
            "# HELP sovereign_runtime_queue_depth Waiting\n# TYPE sovereign_runtime_queue_depth gauge\n"
            "sovereign_runtime_queue_depth 2.0\n"
            "# HELP process_start_time_seconds Start\n# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {start}\n"
        )

    out = workers.merge_metrics([text(3, 1.0, 5, 100.0), text(4, 0.0, 7, 50.0)], "extra_line 1.0\n").decode()
    assert 'sovereign_runtime_requests_total{code="200",endpoint="infer",model="m"} 7.0' in out
    assert 'sovereign_runtime_request_duration_seconds_bucket{le="0.001",model="m"} 12.0' in out
    assert 'sovereign_runtime_request_duration_seconds_bucket{le="+Inf",model="m"} 14.0' in out
    assert 'sovereign_runtime_request_duration_seconds_count{model="m"} 14.0' in out
    assert 'sovereign_runtime_request_duration_seconds_sum{model="m"} 1.0' in out
    assert "sovereign_runtime_ready 0.0" in out  # min: one worker not ready, the server is not
    assert "sovereign_runtime_queue_depth 4.0" in out
    assert "process_start_time_seconds 50.0" in out
    assert "# TYPE sovereign_runtime_requests_total counter" in out
    assert out.endswith("extra_line 1.0\n")


def test_shared_state_slots(tmp_path):
    sup = workers.SharedState(tmp_path, 3, create=True)
    worker = workers.SharedState(tmp_path, 3)
    worker.set_state(1, workers.READY)
    worker.set_pending(1, 42)
    sup.add_restart(2)
    sup.add_restart(2)
    assert list(sup.states()) == [workers.GONE, workers.READY, workers.GONE]
    assert (sup.pending(1), worker.restarts(2), worker.restarts(0)) == (42, 2, 0)


def test_ready_gauge_follows_the_slots_not_a_peers_older_snapshot(tmp_path):
    """A peer's snapshot may predate its readiness by up to SNAPSHOT_INTERVAL: the merged gauge must still say what
    /v2/health/ready says (this worker and every slot ready), not the min of the snapshots."""
    engine = Engine(Settings(model_uri="m"))
    server = SimpleNamespace(engine=engine)
    workers.SharedState(tmp_path, 2, create=True)
    peer = engine.metrics.render().replace(b"sovereign_runtime_ready 1.0", b"sovereign_runtime_ready 0.0")
    (tmp_path / workers.SNAPSHOT.format(1)).write_bytes(peer)  # written while the peer was still loading
    worker = workers.Worker(server, 0, 2, tmp_path)
    engine.set_ready()
    worker.shared.set_state(0, workers.READY)
    worker.shared.set_state(1, workers.LOADING)
    assert _metric(worker.render().decode(), "sovereign_runtime_ready") == 0.0  # the peer is not ready yet
    worker.shared.set_state(1, workers.READY)  # ready now; its next snapshot is not written yet
    assert _metric(worker.render().decode(), "sovereign_runtime_ready") == 1.0
    engine.begin_drain()
    assert _metric(worker.render().decode(), "sovereign_runtime_ready") == 0.0


# ------------------------------------------------------------------------------------------------- the real server


def _events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if type(doc) is dict and "event" in doc:
                out.append(doc)
    return out


def _worker_pids(log: Path) -> dict[int, int]:
    """worker index -> pid of its latest start (the supervisor logs each start)."""
    return {e["worker"]: e["pid"] for e in _events(log) if e["event"] == "worker_started"}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _established_to(port: int) -> dict[str, int]:
    """inode -> client port of every ESTABLISHED server-side TCP socket on loopback ``port``."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, state, inode = f[1], f[2], f[3], f[9]
        if state == "01" and int(local.split(":")[1], 16) == port:
            out[inode] = int(remote.split(":")[1], 16)
    return out


def _metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


INFER_OK = 'sovereign_runtime_requests_total{code="200",endpoint="infer",model="mlp"}'


def test_two_workers_share_the_port_readiness_restart_metrics_and_drain(models, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "runtime.log"
    exp = tmp_path / "exp"  # A/B records: both workers write the color's one database
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps({"name": "wrk-t1", "started": time.time() - 60}))
    env = runtime_env(
        SOVEREIGN_RUNTIME_WORKERS="2",
        SOVEREIGN_RUNTIME_SHUTDOWN_DELAY_S="6",  # after SIGTERM: ready 503, still answering, this long
        SOVEREIGN_RUNTIME_DRAIN_TIMEOUT_S="30",
        SOVEREIGN_RUNTIME_MAX_BATCH_DELAY_MS="0",
        SOVEREIGN_RUNTIME_EXPERIMENT_DIR=str(exp),
        CUDA_VISIBLE_DEVICES="7,9",  # the GPU path's pinning; no CUDA here, so each worker serves on the CPU
    )
    cmd = [*runtime_command(), "serve", "--model-uri", str(models.torchscript), "--model-name", "mlp",
           "--port", str(port)]  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stderr=err, stdout=subprocess.DEVNULL)
    pids: dict[int, int] = {}
    try:
        wait_until(lambda: len(_worker_pids(log)) == 2, 60, "two workers started")
        pids = _worker_pids(log)
        for index, gpu in ((0, "7"), (1, "9")):  # each worker sees its one GPU only
            environ = Path(f"/proc/{pids[index]}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environ
        run_dir = Path(next(e["run_dir"] for e in _events(log) if e["event"] == "supervisor_starting"))
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=5).status == 200, 120, "ready")
        state = workers.SharedState(run_dir, 2)
        assert list(state.states()) == [workers.READY, workers.READY]  # 200 came only once both were ready

        # Both processes answer: 32 keep-alive connections, one infer each, spread by the kernel (SO_REUSEPORT).
        x = torch.randn(1, IN)
        body = infer_body(x)
        conns = [HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(32)]
        for c in conns:
            c.request("POST", "/v2/models/mlp/infer", body, {"content-type": "application/json"})
            resp = c.getresponse()
            assert resp.status == 200, resp.read()
            out = json.loads(resp.read())["outputs"][0]["data"]
            assert torch.allclose(torch.tensor(out).reshape(1, 2), models.expected(x), atol=1e-6)
        ours = {c.sock.getsockname()[1] for c in conns}
        server_side = {inode for inode, client in _established_to(port).items() if client in ours}
        owners = {i: _socket_inodes(pid) & server_side for i, pid in pids.items()}
        assert all(owners.values()), owners  # each worker holds some of the connections
        assert sum(len(v) for v in owners.values()) == 32
        for c in conns:
            c.close()

        # /metrics sums both workers, whichever answers (the others' part is a snapshot at most 0.5 s old)
        def summed() -> bool:
            text = http("GET", f"{base}/metrics").body.decode()
            return _metric(text, INFER_OK) == 32.0 and _metric(text, "sovereign_runtime_workers_ready") == 2.0

        wait_until(summed, 30, "metrics summed over both workers")
        text = http("GET", f"{base}/metrics").body.decode()
        assert _metric(text, "sovereign_runtime_workers") == 2.0
        assert _metric(text, "sovereign_runtime_ready") == 1.0

        def recorded() -> bool:  # the color's count, from the database, whichever worker answers
            doc = http("GET", f"{base}/v2/experiment").json()
            return doc["experiment"] == "wrk-t1" and doc["requests"] == 32 and doc["pending"] == 0

        wait_until(recorded, 30, "both workers' experiment rows counted")

        # A worker killed: restarted; meanwhile the survivor (itself ready) says not ready.
        os.kill(pids[1], signal.SIGKILL)

        def survivor_unready() -> bool:
            r = http("GET", f"{base}/v2/health/ready", timeout=5)
            return r.status == 503 and r.json().get("state") == "workers" and r.json()["worker"] == 0

        wait_until(survivor_unready, 60, "the surviving worker reporting the other not ready")
        wait_until(lambda: _worker_pids(log)[1] != pids[1], 60, "worker 1 started again")
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=5).status == 200, 120, "ready again")
        pids = _worker_pids(log)
        text = http("GET", f"{base}/metrics").body.decode()
        assert _metric(text, "sovereign_runtime_worker_restarts_total") == 1.0
        assert [e["worker"] for e in _events(log) if e["event"] == "worker_exited"] == [1]

        # SIGTERM under keep-alive load: every request answered 200; the supervisor exits 0 after both workers.
        results: list[int | str] = []
        after_signal = [0] * 4
        signalled = threading.Event()
        stop_load = threading.Event()

        def load(slot: int) -> None:
            c = HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                while not stop_load.is_set():
                    try:
                        c.request("POST", "/v2/models/mlp/infer", body, {"content-type": "application/json"})
                        resp = c.getresponse()
                        resp.read()
                        results.append(resp.status)
                    except (OSError, HTTPException) as exc:
                        results.append(f"{type(exc).__name__}: {exc}")
                        return
                    if signalled.is_set():
                        after_signal[slot] += 1
            finally:
                c.close()

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 40, 60, "load running")
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        # The load stops as a balancer's would: once readiness says 503 (both workers draining) - and only
        # after each connection was answered during the drain's shutdown delay.
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=5).status == 503, 30, "ready 503")
        wait_until(lambda: min(after_signal) >= 10 or any(type(r) is str for r in results), 30, "load after SIGTERM")
        stop_load.set()
        for t in threads:
            t.join(60)
        assert [r for r in results if r != 200] == []
        assert proc.wait(90) == 0
        events = _events(log)
        stopped = [e for e in events if e["event"] == "stopped"]
        assert sorted((e["worker"], e["exit_code"]) for e in stopped[-2:]) == [(0, 0), (1, 0)]
        assert events[-1]["event"] == "supervisor_stopped" and events[-1]["exit_code"] == 0
        assert not run_dir.exists()
    finally:
        if proc.poll() is None:  # a failed assertion: nothing is left behind
            for pid in _worker_pids(log).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait(30)
