"""A tracking server that cannot be reached: a REAL closed port, a REAL unresolvable name (.invalid never
resolves, RFC 6761) and a real loopback HTTP server answering 401/403 the way MLflow's basic-auth app does,
all driven through the real MLflow client. The runtime must name host, port and cause, retry on its own
stated schedule (registry.py) and nothing else, and show it on /v2/health/ready while retrying and after
giving up (state "failed"), which is what the deploy quotes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import http, runtime_command, runtime_env, stop, wait_until
from mlflow_testserver import free_port
from sovereign_runtime.model import ModelLoadError, load
from sovereign_runtime.registry import Schedule, with_retries

UNRESOLVABLE = "sovereign-no-such-host.invalid"


def test_schedule_is_bounded_and_stated():
    s = Schedule()
    assert (s.attempts, s.timeout_s) == (6, 10.0)
    assert [s.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 15, 15, 15]
    assert s.total_wait_s() == 30
    assert Schedule(attempts=1).total_wait_s() == 0


@pytest.fixture
def fetch_with(monkeypatch):
    """fetch_with(tracking_uri, attempts): load() of a models:/ URI on a short schedule; returns
    (error, on_retry calls, waits). The waits are recorded, not waited for; everything else is real."""
    import sovereign_runtime.registry as registry

    def run(tracking_uri, attempts):
        retries, sleeps = [], []
        monkeypatch.setattr(registry, "_sleep", sleeps.append)
        env_before = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        with pytest.raises(ModelLoadError) as info:
            load(
                "models:/fraud/3",
                tracking_uri=tracking_uri,
                registry=Schedule(attempts=attempts, timeout_s=3),
                on_retry=lambda reason, fields: retries.append((reason, fields)),
            )
        assert {k: os.environ.get(k) for k in env_before} == env_before  # MLflow's settings: ours only while fetching
        return info.value, retries, sleeps

    return run


def test_connection_refused_names_host_port_and_retries_on_schedule(fetch_with):
    port = free_port()  # bound and released: nothing listens there
    err, retries, sleeps = fetch_with(f"http://127.0.0.1:{port}", attempts=3)
    where = f"127.0.0.1:{port}"
    assert sleeps == [1, 2]
    assert [r[0] for r in retries] == [
        f"cannot reach the MLflow tracking server {where}: connection refused (nothing listens there); "
        f"attempt {n} of 3 failed, next in {d} s"
        for n, d in ((1, 1), (2, 2))
    ]
    assert retries[0][1] == {
        "tracking_server": where,
        "cause": "refused",
        "attempt": 1,
        "attempts": 3,
        "retry_in_s": 1.0,
    }
    text = str(err)
    assert text.startswith(f"cannot reach the MLflow tracking server {where}: connection refused")
    assert "gave up after 3 attempts" in text
    assert err.fields["cause"] == "refused" and err.fields["tracking_server"] == where


def test_unresolvable_name_is_said_so(fetch_with):
    err, retries, sleeps = fetch_with(f"http://{UNRESOLVABLE}:5000", attempts=2)
    assert sleeps == [1] and len(retries) == 1
    assert f"{UNRESOLVABLE}:5000" in str(err) and "name resolution failed" in str(err)
    assert err.fields["cause"] == "resolve"


def test_mlflow_does_not_retry_on_its_own():
    """One attempt = one connection try: MLflow's 7 retries with back-off are off while the runtime fetches."""
    calls = []
    port = free_port()

    def attempt():
        calls.append(dict(os.environ))
        from mlflow.tracking import MlflowClient

        uri = f"http://127.0.0.1:{port}"
        return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("fraud", "3")

    t0 = time.monotonic()
    with pytest.raises(Exception, match="connection refused"):
        with_retries(attempt, f"http://127.0.0.1:{port}", Schedule(attempts=1, timeout_s=4))
    assert time.monotonic() - t0 < 5  # mlflow's default back-off alone would take 2+4+8+... s
    assert calls[0]["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and calls[0]["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "4"


class _StatusServer(ThreadingHTTPServer):
    """A loopback HTTP server answering every request like MLflow's basic-auth app does without (401) or
    with insufficient (403) credentials, or like an overloaded proxy in front of it (503)."""

    def __init__(self, status: int) -> None:
        outer_status = status

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                body = {
                    401: b"You are not authenticated. Please see the MLflow docs on how to authenticate.",
                    403: b"Permission denied",
                }.get(outer_status, b"Service Unavailable")
                self.send_response(outer_status)
                if outer_status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_fail_at_once(status, fetch_with):
    server = _StatusServer(status)
    try:
        port = server.server_address[1]
        err, retries, sleeps = fetch_with(f"http://127.0.0.1:{port}", attempts=6)
    finally:
        server.shutdown()
        server.server_close()
    assert retries == [] and sleeps == []  # new credentials need a restart anyway: no retry
    assert str(err).startswith(f"MLflow tracking server 127.0.0.1:{port}: HTTP {status}")
    assert "MLFLOW_TRACKING_USERNAME" in str(err) and err.fields["cause"] == "auth"


def test_serve_says_why_it_is_not_ready_then_fails_and_exits_1():
    """The real process: ready's 503 body names the cause while it retries (state loading) and after it
    gave up (state failed), for --failed-exit-delay-s; then exit 1; the journal has every attempt.
    Both states last only so long (the retries' 1 + 2 + 4 s, the exit delay's 8 s): long enough for a poll to see
    each at load 20, and nothing here asserts an upper bound on a time."""
    closed = free_port()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*runtime_command(), "serve", "--model-uri", "models:/fraud@champion", "--port", str(port)]
    cmd += ["--tracking-uri", f"http://127.0.0.1:{closed}", "--registry-attempts", "4", "--failed-exit-delay-s", "8"]
    proc = subprocess.Popen(cmd, env=runtime_env(), stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        asked_while_loading = [0.0]  # when the last request that was answered "loading" was sent

        def state(wanted):
            asked = time.monotonic()
            body = http("GET", f"{base}/v2/health/ready", timeout=5).json()
            seen.append(body)
            if body["state"] == "loading":
                asked_while_loading[0] = asked
            return body["state"] == wanted

        def retrying_seen():
            got = state("loading") and "attempt" in seen[-1]["reason"]
            assert seen[-1]["state"] != "failed", f"failed before a poll saw a retry: {seen[-3:]}"
            return got

        # The wait covers the process start (torch, then mlflow in the loader thread: minutes at load 20).
        try:
            wait_until(retrying_seen, 300, "a retry on ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answers: {seen[-3:]}; exit status {proc.poll()}") from None
        retrying = seen[-1]
        assert retrying["ready"] is False
        assert f"127.0.0.1:{closed}" in retrying["reason"] and "connection refused" in retrying["reason"]
        wait_until(lambda: state("failed"), 120, "state failed")
        failed = seen[-1]
        assert f"127.0.0.1:{closed}" in failed["reason"] and "gave up after 4 attempts" in failed["reason"]
        assert proc.wait(60) == 1
        # It gave up after a request answered "loading" was sent, and held --failed-exit-delay-s from then on: the
        # exit comes at least 8 s after that request, however late this test saw either state.
        assert time.monotonic() - asked_while_loading[0] >= 8
        events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        retried = [e for e in events if e["event"] == "registry_unreachable"]
        assert [(e["attempt"], e["retry_in_s"]) for e in retried] == [(1, 1.0), (2, 2.0), (3, 4.0)]
        final = next(e for e in events if e["event"] == "load_failed")
        assert final["tracking_server"] == f"127.0.0.1:{closed}" and final["cause"] == "refused"
        assert final["error"] == failed["reason"] and final["exit_in_s"] == 8
    finally:
        stop(proc)


def test_server_errors_are_retried(fetch_with):
    server = _StatusServer(503)
    try:
        port = server.server_address[1]
        err, retries, sleeps = fetch_with(f"http://127.0.0.1:{port}", attempts=3)
    finally:
        server.shutdown()
        server.server_close()
    assert sleeps == [1, 2] and [r[1]["cause"] for r in retries] == ["http", "http"]
    assert f"127.0.0.1:{port}: HTTP 503 from the server" in str(err) and "gave up after 3 attempts" in str(err)
