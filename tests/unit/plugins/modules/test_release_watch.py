# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""release_watch against real local servers (no mocks).

watch=ready: a real HTTP server answering /v2/health/ready from a script of answers (the runtime's readiness
bodies), or nothing listening. watch=traffic: a real haproxy rendered from the traffic_switch role's template, in
front of two OIP servers (blue, green) in threads; HAProxy sets X-Sovereign-Color as in production.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import pathlib
import shutil
import tempfile
import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.modules import release_watch
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    GOLDEN,
    HAProxy,
    OIPServer,
    free_port,
    needs_haproxy,
    render_haproxy_cfg,
    run_module,
    template_vars,
)

LOADING = (503, {"ready": False, "state": "loading", "reason": "model is loading"})
CAUSE = "cannot reach the tracking server mlflow.internal:5000: connection refused"
UNREACHABLE = (503, {"ready": False, "state": "loading", "reason": CAUSE})
FAILED = (503, {"ready": False, "state": "failed", "reason": "golden check failed: output y differs"})
READY = (200, {"ready": True})


class ReadyServer:
    """/v2/health/ready answers ``script`` in order, then repeats its last answer; ``stop_after`` answers, it closes
    its socket (a runtime that exited). ``(status, body)``: a dict body is sent as JSON, bytes as they are."""

    def __init__(self, script, stop_after=None):
        self.script = list(script)
        self.stop_after = stop_after
        self.answered = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                status, body = owner.script[min(owner.answered, len(owner.script) - 1)]
                owner.answered += 1
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                if owner.stop_after is not None and owner.answered >= owner.stop_after:
                    threading.Thread(target=owner.stop, daemon=True).start()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.stopped = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()


# script, stop_after, ok, msg fragments, result fields
READY_CASES = [
    dict(id="ready-at-once", script=[READY], ok=True, want=dict(ready=True, polls=1, reason="")),
    dict(id="loading-then-ready", script=[LOADING, LOADING, READY], ok=True, want=dict(ready=True, polls=3)),
    dict(
        id="failed-stops-at-once",
        script=[LOADING, FAILED],
        ok=False,
        msg=["did not become ready", "the runtime reports state 'failed'", "golden check failed: output y differs"],
        want=dict(ready=False, state="failed", polls=2),
        fast=True,
    ),
    dict(
        id="timeout-quotes-the-runtime-reason",
        script=[UNREACHABLE],
        ok=False,
        msg=["within 1.5s", CAUSE, "state loading"],
        want=dict(ready=False, state="loading"),
    ),
    dict(
        id="reason-kept-when-the-runtime-exits",
        script=[UNREACHABLE],
        stop_after=1,
        ok=False,
        msg=["mlflow.internal:5000", "last poll: connection refused"],
        want=dict(ready=False, last_answer="connection refused"),
    ),
    dict(
        id="body-without-json",
        script=[(503, b"<html>Service Unavailable</html>")],
        ok=False,
        msg=["HTTP 503: <html>Service Unavailable</html>"],
        want=dict(ready=False, state=None),
    ),
    dict(
        id="nothing-listening",
        script=None,
        ok=False,
        msg=["no readiness body", "last poll: connection refused"],
        want=dict(ready=False, last_answer="connection refused"),
    ),
]


@pytest.mark.parametrize("case", READY_CASES, ids=[c["id"] for c in READY_CASES])
def test_wait_ready(capsys, case):
    server = ReadyServer(case["script"], case.get("stop_after")) if case["script"] else None
    url = f"http://127.0.0.1:{free_port()}" if server is None else server.url
    try:
        start = time.monotonic()
        result = run_module(
            release_watch.main,
            dict(watch="ready", url=url, color="green", timeout=1.5, poll_interval=0.1, request_timeout=1),
            capsys,
        )
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            server.stop()
    assert bool(result.get("failed")) is not case["ok"], result
    assert result["changed"] is False
    for fragment in case.get("msg", []):
        assert fragment in result["msg"], result["msg"]
    for key, value in case["want"].items():
        assert result[key] == value, (key, result)
    if case.get("fast"):
        assert elapsed < 1.0, f"a failed runtime must stop the wait at once, took {elapsed:.2f}s"


def test_wait_ready_bad_url(capsys):
    result = run_module(release_watch.main, dict(watch="ready", url="ftp://x", color="green"), capsys)
    assert result["failed"]
    assert "is not an http:// or https:// URL" in result["msg"]


def test_traffic_needs_a_model_name(capsys):
    result = run_module(release_watch.main, dict(url="http://127.0.0.1:1", color="green"), capsys)
    assert result["failed"]
    assert "model_name" in result["msg"]


# ---------------------------------------------------------------------------------------------------------------
# watch=traffic through a real haproxy
# ---------------------------------------------------------------------------------------------------------------


class Switch:
    """haproxy (the role's template) in front of OIP servers blue and green, live color ``live``."""

    def __init__(self, live, green_mode="correct", green_slow=0.08):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
        self.blue = OIPServer().start()
        self.green = OIPServer(mode=green_mode, slow_seconds=green_slow).start()
        self.frontend_port = free_port()
        colors = {"blue": {"port": self.blue.port}, "green": {"port": self.green.port}}
        values = template_vars(self.dir, self.frontend_port, free_port(), colors)
        (self.dir / "live.map").write_text(f"live {live}\n")
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(render_haproxy_cfg(values))
        self.haproxy = HAProxy(cfg, values["traffic_switch_admin_socket"]).start()
        for color in ("blue", "green"):
            self.haproxy.wait_status(color, "UP")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.frontend_port}"

    def close(self):
        self.haproxy.stop()
        self.blue.stop()
        self.green.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def switch(**kwargs):
    env = Switch(**kwargs)
    try:
        yield env
    finally:
        env.close()


WATCH = dict(model_name="double", color="green", seconds=1.0, interval=0, max_error_ratio=0.01, min_requests=5)

TRAFFIC_CASES = [
    dict(id="healthy-green-holds", live="green", args={}, ok=True, want=dict(degraded=False, errors=0, wrong_color=0)),
    dict(
        id="traffic-still-on-blue-is-wrong-color",
        live="blue",
        args={},
        ok=False,
        msg=["green degraded after taking traffic", "error ratio 1.0000", "answered by blue, not green"],
        want=dict(degraded=True, error_ratio=1.0),
    ),
    dict(
        id="failing-green-error-ratio",
        live="green",
        green_mode="wrong_status",
        args={},
        ok=False,
        msg=["error ratio", "500: "],
        want=dict(degraded=True, wrong_color=0),
    ),
    dict(
        id="slow-green-p99",
        live="green",
        green_mode="slow",
        args=dict(max_p99_ms=40, min_requests=3),
        ok=False,
        msg=["p99", "> 40 ms"],
        want=dict(degraded=True, errors=0),
    ),
    dict(
        id="too-few-requests",
        live="green",
        green_mode="slow",
        args=dict(max_p99_ms=5000, min_requests=1000),
        ok=False,
        msg=["requests completed in the watch window (minimum 1000)"],
        want=dict(degraded=True),
    ),
    dict(
        id="golden-file-on-the-host",
        live="green",
        args=dict(golden_file="GOLDEN_FILE"),
        ok=True,
        want=dict(degraded=False),
        metadata_requests=0,
    ),
    dict(
        id="golden-given",
        live="green",
        args=dict(golden=GOLDEN),
        ok=True,
        want=dict(degraded=False),
        metadata_requests=0,
    ),
    dict(
        id="metadata-names-a-missing-golden-file",
        live="green",
        green_mode="metadata_golden_label",
        args={},
        ok=False,
        msg=["could not read the golden example", "/models/double/golden.json"],
        want=dict(degraded=True, requests=0),
    ),
    dict(id="no-window", live="blue", args=dict(seconds=0), ok=True, want=dict(degraded=False, requests=0)),
]


@needs_haproxy
@pytest.mark.parametrize("case", TRAFFIC_CASES, ids=[c["id"] for c in TRAFFIC_CASES])
def test_watch_traffic(capsys, tmp_path, case):
    args = dict(WATCH, **case["args"])
    if args.get("golden_file") == "GOLDEN_FILE":
        path = tmp_path / "golden.json"
        path.write_text(json.dumps(GOLDEN))
        args["golden_file"] = str(path)
    with switch(live=case["live"], green_mode=case.get("green_mode", "correct")) as env:
        args["url"] = env.url
        result = run_module(release_watch.main, args, capsys)
        metadata_gets = [r for r in env.green.requests + env.blue.requests if r == ("GET", "/v2/models/double")]
    assert bool(result.get("failed")) is not case["ok"], result
    assert result["changed"] is False
    for fragment in case.get("msg", []):
        assert fragment in result["msg"], result["msg"]
    for key, value in case["want"].items():
        assert result[key] == value, (key, result)
    if case["ok"] and args["seconds"] > 0:
        assert result["requests"] >= WATCH["min_requests"]
        assert result["p99_ms"] is not None and result["p50_ms"] <= result["p99_ms"]
    if "metadata_requests" in case:
        assert len(metadata_gets) == case["metadata_requests"]


@needs_haproxy
def test_watch_traffic_in_check_mode_measures_the_same(capsys):
    """It only reads: check mode runs the window too (the role skips it in check mode, where nothing switched)."""
    with switch(live="green") as env:
        result = run_module(release_watch.main, dict(WATCH, url=env.url), capsys, check_mode=True)
    assert not result.get("failed"), result
    assert result["requests"] >= WATCH["min_requests"]


def test_watch_reconnects_when_the_frontend_closes_each_connection(capsys):
    """A frontend that closes every keep-alive connection after one answer (Connection: close): every request
    still counts, none is an error."""
    server = OIPServer(mode="close_each").start()
    try:
        result = run_module(
            release_watch.main,
            dict(WATCH, url=f"http://127.0.0.1:{server.port}", color="oip"),
            capsys,
        )
    finally:
        server.stop()
    assert not result.get("failed"), result
    assert result["errors"] == 0
    assert server.connections >= result["requests"] > 5
