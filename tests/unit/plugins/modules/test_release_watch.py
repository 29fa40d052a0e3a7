# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""release_watch against real local servers (no mocks).

watch=ready: a real HTTP server answering /v2/health/ready from a script of answers (the runtime's readiness
bodies), or nothing listening. watch=traffic: a real haproxy rendered from the traffic_switch role's template, in
front of two OIP servers (blue, green) in threads; HAProxy sets X-Sovereign-Color as in production. With
prometheus_url: a real Prometheus process (Debian's) scraping a runtime-shaped metrics page (see the section at the
end).
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
from ansible_collections.sovereign.mlops.tests.unit.plugins.module_utils.prometheus_fixture import (
    PrometheusProcess,
    RuntimeMetrics,
    drive,
    needs_prometheus,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    GOLDEN,
    HAProxy,
    OIPServer,
    needs_haproxy,
    refused_port,
    render_haproxy_cfg,
    run_module,
    template_vars,
    warnings,
)
from ports import free_port

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
    with refused_port() as port:
        _wait_ready(capsys, case, server, f"http://127.0.0.1:{port}" if server is None else server.url)


def _wait_ready(capsys, case, server, url):
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
            self.haproxy.wait_status(color, "UP", exact=True)

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


# --- the Prometheus source (plugins/module_utils/_prometheus.py) ------------------------------------------------
# A real Prometheus process (Debian's, from make bootstrap) scraping a runtime-shaped /metrics page of green on
# host inf-01 every 0.5 s (tests/unit/plugins/module_utils/prometheus_fixture.py): those counters stand for every
# client's traffic; the watch's own golden requests go through the real haproxy above as in the other cases.


@pytest.fixture
def prometheus_runtime():
    metrics = RuntimeMetrics()
    prom = PrometheusProcess({f"127.0.0.1:{metrics.port}": {"host": "inf-01", "color": "green"}})
    try:
        prom.wait_targets_up(1)
        yield prom, metrics
    finally:
        prom.close()
        metrics.close()


PROM_WATCH = dict(WATCH, prometheus_host="inf-01", prometheus_scrape_interval=0.5)


def _watch_during(env, prom, metrics, ok, errors, slow, capsys, **extra):
    """Run the watch while ``metrics`` sees ok/errors requests a second (slow of every 100 over 50 ms)."""
    drive(metrics, 1.5, ok=ok, errors=errors, slow_per_100=slow)  # history before the window
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            drive(metrics, 0.25, ok=ok, errors=errors, slow_per_100=slow)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        return run_module(
            release_watch.main, dict(PROM_WATCH, url=env.url, prometheus_url=prom.url, seconds=2.0, **extra), capsys
        )
    finally:
        stop.set()
        thread.join()


@needs_haproxy
@needs_prometheus
def test_prometheus_figures_judge_the_window(capsys, prometheus_runtime):
    prom, metrics = prometheus_runtime
    with switch(live="green") as env:
        result = _watch_during(env, prom, metrics, ok=100, errors=0, slow=0, capsys=capsys)
    assert not result.get("failed"), result
    assert result["source"] == "prometheus" and result["prometheus_error"] == ""
    assert result["requests"] == result["prometheus"]["requests"] and result["requests"] >= 100
    assert result["error_ratio"] == 0.0 and result["p99_ms"] <= 10
    assert result["probes"]["requests"] >= WATCH["min_requests"] and result["probes"]["errors"] == 0
    assert "(Prometheus http://127.0.0.1:" in result["msg"]


@needs_haproxy
@needs_prometheus
def test_prometheus_sees_errors_the_probes_do_not(capsys, prometheus_runtime):
    """Other clients get 5 % 503s from green while the watch's golden requests succeed: degraded, by Prometheus."""
    prom, metrics = prometheus_runtime
    with switch(live="green") as env:
        result = _watch_during(env, prom, metrics, ok=95, errors=5, slow=0, capsys=capsys)
    assert result.get("failed"), result
    assert result["source"] == "prometheus" and result["degraded"] is True
    assert result["probes"]["errors"] == 0
    assert result["error_ratio"] == pytest.approx(0.05, abs=0.01)
    assert "error ratio" in result["msg"] and "Prometheus" in result["msg"]


@needs_haproxy
@needs_prometheus
def test_prometheus_p99_over_the_limit_is_degraded(capsys, prometheus_runtime):
    prom, metrics = prometheus_runtime
    with switch(live="green") as env:
        result = _watch_during(env, prom, metrics, ok=100, errors=0, slow=3, capsys=capsys, max_p99_ms=50)
    assert result.get("failed"), result
    assert result["source"] == "prometheus" and result["p99_ms"] > 50
    assert "p99" in result["reason"]


@needs_haproxy
def test_unreachable_prometheus_falls_back_to_the_probes(capsys):
    with refused_port() as port, switch(live="green") as env:
        url = f"http://127.0.0.1:{port}"
        result = run_module(release_watch.main, dict(PROM_WATCH, url=env.url, prometheus_url=url), capsys)
    assert not result.get("failed"), result
    assert result["source"] == "probes"
    assert f"cannot reach Prometheus at {url}" in result["prometheus_error"]
    assert any("judged on direct probes" in w for w in warnings(result)), result
    assert result["requests"] == result["probes"]["requests"] >= WATCH["min_requests"]


@needs_haproxy
@needs_prometheus
def test_prometheus_without_data_for_the_host_falls_back_to_the_probes(capsys, prometheus_runtime):
    prom, _metrics = prometheus_runtime
    with switch(live="green") as env:
        args = dict(PROM_WATCH, url=env.url, prometheus_url=prom.url, prometheus_host="inf-09")
        result = run_module(release_watch.main, args, capsys)
    assert not result.get("failed"), result
    assert result["source"] == "probes"
    assert "has 0 infer requests of green on host inf-09" in result["prometheus_error"]


def test_prometheus_url_needs_the_host_label(capsys):
    result = run_module(
        release_watch.main, dict(WATCH, url="http://127.0.0.1:1", prometheus_url="http://127.0.0.1:2"), capsys
    )
    assert result.get("failed") and "prometheus_host" in result["msg"], result
