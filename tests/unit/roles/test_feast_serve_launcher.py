"""roles/feast/files/feast_serve.py, the launcher that binds Feast's metrics server to one address.

Real: the pinned Feast of the dev venv (`feast serve --metrics`, gunicorn with 2 workers) started through the
launcher on a throwaway repository (file registry, a real `redis-server` on loopback from feast_testrepo), its
metrics server asked to bind 127.0.0.2 (an address of lo that is not 127.0.0.1): /metrics answers there with
Feast's own series and is refused on 127.0.0.1 (the same port): one address, not every address.
The molecule scenario `feast` checks the same on the container's internal address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from feast_testrepo import RedisServer, feature_store_yaml, redis_server_binary
from mlflow_testserver import free_port

pytest.importorskip("feast", reason="Feast is not in the dev venv")
if redis_server_binary() is None:
    pytest.fail("redis-server is not installed: run scripts/bootstrap.sh (Debian's redis-server)", pytrace=False)

LAUNCHER = Path(__file__).resolve().parents[3] / "roles" / "feast" / "files" / "feast_serve.py"
METRICS_ADDRESS = "127.0.0.2"


def launcher(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=60, check=False, **kwargs
    )


def refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_refuses_a_wildcard_and_a_bind_that_cannot_work():
    wildcard = launcher("--metrics-address", "0.0.0.0", "--metrics-port", "6567", "--", "serve")
    assert wildcard.returncode == 2 and "must be one address" in wildcard.stderr
    # 192.0.2.1 (TEST-NET-1) is no address of this host: the unit stops with a message, Feast never starts.
    foreign = launcher("--metrics-address", "192.0.2.1", "--metrics-port", "6567", "--", "serve")
    assert foreign.returncode == 1
    assert "cannot bind the metrics server to 192.0.2.1:6567" in foreign.stderr
    nothing = launcher("--metrics-address", METRICS_ADDRESS, "--metrics-port", "6567", "--")
    assert nothing.returncode == 2 and "no Feast arguments" in nothing.stderr


def test_metrics_answer_on_the_given_address_only(tmp_path):
    from feast import FeatureStore

    redis = RedisServer(tmp_path / "redis").start()
    proc = None
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "feature_store.yaml").write_text(feature_store_yaml("launcher", redis, tmp_path / "registry.db"))
        FeatureStore(repo_path=str(repo)).apply([])  # an empty registry is enough to serve /health and /metrics
        serve_port, metrics_port = free_port(), free_port()
        env = {**os.environ, "PROMETHEUS_MULTIPROCESS_DIR": str(tmp_path / "prometheus")}
        (tmp_path / "prometheus").mkdir()
        args = ["--metrics-address", METRICS_ADDRESS, "--metrics-port", str(metrics_port), "--"]
        args += ["--chdir", str(repo), "serve", "--host", "127.0.0.1", "--port", str(serve_port), "--workers", "2"]
        args += ["--max-requests", "0", "--metrics", "--no-access-log"]
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            with contextlib.suppress(OSError, urllib.error.URLError):
                if get(f"http://127.0.0.1:{serve_port}/health")[0] == 200:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("feast serve did not answer /health within 90 s")
        status, text = get(f"http://{METRICS_ADDRESS}:{metrics_port}/metrics")
        assert status == 200
        assert "feast_feature_server_" in text  # Feast's own series, aggregated over the workers
        assert refused("127.0.0.1", metrics_port)  # not every address: only the one asked for
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        redis.stop()
