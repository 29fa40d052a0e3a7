"""The real `sovereign-runtime serve` process on a free loopback port: HTTP, env-var configuration,
SIGTERM with a request in flight, exit status. Timings here are generous margins, not measurements."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import torch
from conftest import IN, http, infer_body, runtime_command, runtime_env, stop, wait_until


def test_serve_sigterm_drains_in_flight_and_exits_0(models):
    port = 0
    from mlflow_testserver import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Configured through the environment, as the systemd unit does; one flag overrides its variable.
    env = runtime_env(
        SOVEREIGN_RUNTIME_MODEL_URI=str(models.mlflow_pt2),
        SOVEREIGN_RUNTIME_MODEL_NAME="mlp",
        SOVEREIGN_RUNTIME_PORT=str(port),
        SOVEREIGN_RUNTIME_COLOR="blue",
        SOVEREIGN_RUNTIME_CHAOS_LATENCY_MS="3000",  # every infer takes >= 3 s: one is surely in flight
        SOVEREIGN_RUNTIME_SHUTDOWN_DELAY_S="2.5",  # keep listening (ready=503) this long after SIGTERM
        SOVEREIGN_RUNTIME_DRAIN_TIMEOUT_S="20",
    )
    proc = subprocess.Popen(
        [*runtime_command(), "serve", "--color", "green"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=2).status == 200, 60, "ready")
        assert http("GET", f"{base}/v2/health/live").status == 200
        meta = http("GET", f"{base}/v2/models/mlp").json()
        assert meta["parameters"]["color"] == "green"  # flag beats SOVEREIGN_RUNTIME_COLOR=blue
        metrics = http("GET", f"{base}/metrics").body.decode()
        assert 'color="green"' in metrics

        x = torch.randn(2, IN)
        result = {}

        def in_flight():
            result["resp"] = http("POST", f"{base}/v2/models/mlp/infer", infer_body(x), timeout=30)

        worker = threading.Thread(target=in_flight)
        worker.start()
        wait_until(lambda: 'sovereign_runtime_in_flight_requests 1.0' in http("GET", f"{base}/metrics").body.decode(),
                   10, "request in flight")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        ready = http("GET", f"{base}/v2/health/ready", timeout=5)
        assert ready.status == 503 and ready.json()["state"] == "draining"
        worker.join(30)
        resp = result["resp"]
        assert resp.status == 200, resp.body
        out = resp.json()["outputs"][0]
        assert torch.allclose(torch.tensor(out["data"]).reshape(2, 2), models.expected(x), atol=1e-6)
        assert proc.wait(30) == 0
        assert time.monotonic() - sent < 25  # within the drain timeout (+ margin)
        events = [json.loads(line)["event"] for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert events[:3] == ["starting", "model_loaded", "ready"] and events[-2:] == ["draining", "stopped"]
    finally:
        stop(proc)


def test_serve_golden_failure_stays_unready_then_exits_0(models):
    from mlflow_testserver import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*runtime_command(), "serve", "--model-uri", str(models.bad_golden), "--model-name", "mlp"]
    cmd += ["--port", str(port)]
    proc = subprocess.Popen(cmd, env=runtime_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(
            lambda: http("GET", f"{base}/v2/health/ready", timeout=2).json().get("state") == "failed", 60, "failed"
        )
        ready = http("GET", f"{base}/v2/health/ready")
        assert ready.status == 503 and "golden" in ready.json()["reason"]
        assert http("GET", f"{base}/v2/health/live").status == 200
        assert http("POST", f"{base}/v2/models/mlp/infer", infer_body(torch.zeros(1, IN))).status == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert '"golden_failed"' in proc.stderr.read()
    finally:
        stop(proc)


def test_serve_load_failure_exits_1(tmp_path):
    from mlflow_testserver import free_port

    cmd = [*runtime_command(), "serve", "--model-uri", str(tmp_path / "missing"), "--port", str(free_port())]
    cmd += ["--failed-exit-delay-s", "0"]  # the hold is test_registry_unreachable.py's
    proc = subprocess.run(cmd, env=runtime_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert '"load_failed"' in proc.stderr and "does not exist" in proc.stderr


NO_NUMPY = '''
import sys
from importlib.machinery import PathFinder


class NoNumpyPathFinder(PathFinder):
    """Hosts install the runtime from a wheelhouse without numpy: make it absent here too."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [NoNumpyPathFinder if f is PathFinder else f for f in sys.meta_path]
'''


def test_serves_without_numpy_and_without_its_warning(models, tmp_path):
    """The runtime's wheelhouse has no numpy (requirements/hosts-runtime.in): load, warm-up, golden check
    and inference work without it, and torch's "Failed to initialize NumPy" warning is silenced."""
    (tmp_path / "sitecustomize.py").write_text(NO_NUMPY)
    env = runtime_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    import sys

    control = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "Failed to initialize NumPy: No module named 'numpy'" in control.stderr  # what hosts logged

    from mlflow_testserver import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*runtime_command(), "serve", "--model-uri", str(models.mlflow_pt2), "--model-name", "mlp"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=2).status == 200, 60, "ready")
        x = torch.randn(3, IN)
        resp = http("POST", f"{base}/v2/models/mlp/infer", infer_body(x))
        assert resp.status == 200
        out = resp.json()["outputs"][0]
        assert torch.allclose(torch.tensor(out["data"]).reshape(3, 2), models.expected(x), atol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stderr = proc.stderr.read()
        assert "NumPy" not in stderr and "numpy" not in stderr, stderr
    finally:
        stop(proc)
