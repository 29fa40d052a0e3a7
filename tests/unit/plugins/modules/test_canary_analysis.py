# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""canary_analysis through a real haproxy (the role's template) splitting between two OIP servers, and a real
Prometheus for the Prometheus source (skipped, saying so, where the binaries are missing)."""

from __future__ import annotations

import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.modules import canary_analysis
from ansible_collections.sovereign.mlops.tests.unit.plugins.module_utils.prometheus_fixture import (
    PrometheusProcess,
    RuntimeMetrics,
    drive,
    needs_prometheus,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    free_port,
    needs_haproxy,
    run_module,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.test_release_watch import switch

BASE = dict(
    canary="green",
    weight=10,
    model_name="double",
    seconds=1.0,
    max_seconds=1.0,
    interval=0,
    min_requests=10,
    max_p99_ms=1000,
)


def split(env, weight):
    """The split as blue_green_switch leaves it (live blue, canary green, weight)."""
    mapfile = env.dir / "live.map"
    for key, value in (("canary", "green"), ("weight", str(weight))):
        env.haproxy.command(f"add map {mapfile} {key} {value}")


def analyse(env, capsys, **extra):
    return run_module(canary_analysis.main, dict(BASE, url=env.url, **extra), capsys)


@needs_haproxy
def test_healthy_canary_passes_and_each_arm_is_probed_through_its_key(capsys):
    with switch(live="blue") as env:
        split(env, 10)
        result = analyse(env, capsys)
        blue_seen, green_seen = len(env.blue.requests), len(env.green.requests)
    assert not result.get("failed"), result
    assert result["verdict"] == "pass" and result["source"] == "probes" and result["holds"] == 1
    assert result["canary"]["requests"] >= 10 and result["stable"]["requests"] >= 10
    assert result["canary"]["wrong_color"] == 0 and result["stable"]["wrong_color"] == 0
    # Both arms got their probes although the canary gets only 10 % of keyless traffic.
    assert green_seen >= result["canary"]["requests"] and blue_seen >= result["stable"]["requests"]
    assert result["ended"] > result["started"]
    assert "passed: canary green 10% vs stable blue" in result["msg"]


@needs_haproxy
def test_slow_canary_fails_on_p99_with_the_measurement(capsys):
    with switch(live="blue", green_mode="slow", green_slow=0.06) as env:
        split(env, 10)
        result = analyse(env, capsys, max_p99_ms=40, seconds=1.5, max_seconds=1.5, min_requests=5)
    assert result["failed"] is True and result["verdict"] == "fail"
    assert any(d.startswith("canary p99 ") and "vs limit 40 ms" in d for d in result["failed_checks"])
    assert "canary analysis failed: canary p99" in result["msg"]


@needs_haproxy
def test_slower_than_stable_fails_the_comparison(capsys):
    with switch(live="blue", green_mode="slow", green_slow=0.04) as env:
        split(env, 10)
        result = analyse(env, capsys, seconds=1.5, max_seconds=1.5, min_requests=5)
    assert result["verdict"] == "fail"
    assert [c["name"] for c in result["checks"] if c["ok"] is False] == ["p99_vs_stable"]


@needs_haproxy
def test_erroring_canary_fails_at_once(capsys):
    """500s on the canary: failed as soon as the errors exceed what min_requests could allow, not after the hold."""
    with switch(live="blue", green_mode="wrong_status") as env:
        split(env, 10)
        result = analyse(env, capsys, seconds=5, max_seconds=5, min_requests=20)
    assert result["verdict"] == "fail" and result["ended"] - result["started"] < 10
    assert "canary error ratio" in result["msg"] and "500 from green" in result["msg"]


@needs_haproxy
def test_too_few_requests_holds_longer_then_is_inconclusive(capsys):
    with switch(live="blue") as env:
        split(env, 10)
        result = analyse(env, capsys, seconds=0.3, max_seconds=0.9, interval=0.05, min_requests=1000)
    assert result["failed"] is True and result["verdict"] == "inconclusive"
    assert result["holds"] == 3
    assert "inconclusive after 0.9s" in result["msg"] and "each needs 1000" in result["msg"]


@needs_haproxy
def test_canary_down_is_answered_by_stable_and_fails(capsys):
    """HAProxy's fallback answers the canary's keys from the live color: no client error, but the analysis sees the
    wrong color and fails."""
    with switch(live="blue") as env:
        split(env, 10)
        env.green.stop()
        env.haproxy.wait_status("green", "DOWN")
        result = analyse(env, capsys)
    assert result["verdict"] == "fail"
    assert result["probes"]["canary"]["wrong_color"] == result["probes"]["canary"]["requests"] > 0
    assert "answered by blue, not green" in result["msg"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (dict(weight=0), "weight must be between 1 and 99 during an analysis, got 0"),
        (dict(weight=100), "weight must be between 1 and 99"),
        (dict(stable="green"), "stable must be the other color than canary"),
        (dict(max_seconds=0.5), "max_seconds (0.5) must be >= seconds (1)"),
        (dict(queries=[dict(name="x", query="up", max=1)]), "queries need prometheus_url"),
        (dict(queries=[dict(name="x", query="up")]), "each query needs a name, a query and a min and/or max"),
    ],
)
def test_bad_input(capsys, extra, expected):
    result = run_module(canary_analysis.main, dict(BASE, url="http://127.0.0.1:9", **extra), capsys)
    assert result["failed"] is True and expected in result["msg"], result["msg"]


@pytest.fixture
def prometheus_two_colors():
    blue, green = RuntimeMetrics(), RuntimeMetrics()
    prom = PrometheusProcess(
        {
            f"127.0.0.1:{blue.port}": {"host": "inf-01", "color": "blue"},
            f"127.0.0.1:{green.port}": {"host": "inf-01", "color": "green"},
        }
    )
    try:
        prom.wait_targets_up(2)
        yield prom, blue, green
    finally:
        prom.close()
        blue.close()
        green.close()


def _during(metrics_traffic, fn):
    """Run ``fn`` while each (metrics, ok, errors, slow) sees that traffic a second."""
    for metrics, ok, errors, slow in metrics_traffic:
        drive(metrics, 1.0, ok=ok, errors=errors, slow_per_100=slow)
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            for metrics, ok, errors, slow in metrics_traffic:
                drive(metrics, 0.25, ok=ok, errors=errors, slow_per_100=slow)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        stop.set()
        thread.join()


@needs_haproxy
@needs_prometheus
def test_prometheus_judges_every_clients_requests(capsys, prometheus_two_colors):
    """Other clients get 5 % 503s from green while the probes succeed: failed, on Prometheus's figures."""
    prom, blue, green = prometheus_two_colors
    with switch(live="blue") as env:
        split(env, 10)
        result = _during(
            [(blue, 100, 0, 0), (green, 95, 5, 0)],
            lambda: analyse(
                env,
                capsys,
                seconds=2.0,
                max_seconds=2.0,
                prometheus_url=prom.url,
                prometheus_host="inf-01",
                prometheus_scrape_interval=0.5,
            ),
        )
    assert result["source"] == "prometheus" and result["prometheus_error"] == "", result
    assert result["verdict"] == "fail" and result["probes"]["canary"]["errors"] == 0
    assert result["canary"]["error_ratio"] == pytest.approx(0.05, abs=0.015)
    assert "Prometheus http://127.0.0.1:" in result["msg"]


@needs_haproxy
@needs_prometheus
def test_user_query_gates_the_canary(capsys, prometheus_two_colors):
    prom, blue, green = prometheus_two_colors
    query = 'sum(increase(sovereign_runtime_requests_total{host="$host",color="$color"}[$window]))'
    with switch(live="blue") as env:
        split(env, 10)
        result = _during(
            [(blue, 100, 0, 0), (green, 100, 0, 0)],
            lambda: analyse(
                env,
                capsys,
                seconds=2.0,
                max_seconds=2.0,
                prometheus_url=prom.url,
                prometheus_host="inf-01",
                prometheus_scrape_interval=0.5,
                queries=[dict(name="canary_requests", query=query, max=1)],
            ),
        )
    assert result["verdict"] == "fail", result
    assert [c["name"] for c in result["checks"] if c["ok"] is False] == ["canary_requests"]
    assert result["queries"][0]["query"].startswith('sum(increase(sovereign_runtime_requests_total{host="inf-01"')


@needs_haproxy
def test_unreachable_prometheus_falls_back_to_the_probes(capsys):
    with switch(live="blue") as env:
        split(env, 10)
        url = f"http://127.0.0.1:{free_port()}"
        result = analyse(env, capsys, prometheus_url=url, prometheus_host="inf-01")
    assert result["verdict"] == "pass" and result["source"] == "probes"
    assert "cannot reach Prometheus" in result["prometheus_error"]


def test_controller_gone_is_a_closed_pipe_on_stdout():
    """The orphan check: a pipe whose reader closed says gone; an open pipe and a regular file do not."""
    import os
    import tempfile

    read, write = os.pipe()
    try:
        assert not canary_analysis.controller_gone(write)
        os.close(read)
        read = None
        assert canary_analysis.controller_gone(write)
    finally:
        os.close(write)
        if read is not None:
            os.close(read)
    with tempfile.TemporaryFile() as handle:
        assert not canary_analysis.controller_gone(handle.fileno())


def test_controller_gone_when_the_parent_died_but_the_pipe_lives_on(tmp_path):
    """The orphan check's second half, for real: a child whose parent shell exits (its stdout pipe still open,
    held by this test) sees it is gone; while the shell lives it does not."""
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(
        "import os, sys, time\n"
        "from ansible_collections.sovereign.mlops.plugins.modules import canary_analysis as ca\n"
        "seen = [ca.controller_gone()]\n"  # the shell waits for the ready file: alive, not gone
        "open(sys.argv[1] + '.ready', 'w').close()\n"
        "deadline = time.monotonic() + 20\n"
        "while not ca.controller_gone() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "seen.append(ca.controller_gone())\n"
        "open(sys.argv[1] + '.tmp', 'w').write(repr(seen))\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    )
    out = tmp_path / "seen"
    # The shell starts the child, exits once the child has checked, and the child keeps the shell's stdout (this
    # test's pipe) open: what a killed controller leaves behind.
    script = f'"{sys.executable}" "{child}" "{out}" & while [ ! -e "{out}.ready" ]; do sleep 0.05; done'
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.wait(120)
    for _attempt in range(400):
        if out.exists():
            break
        time.sleep(0.05)
    proc.stdout.close()
    assert out.read_text() == "[False, True]"


@needs_haproxy
def test_an_orphaned_analysis_stops_probing():
    """A long hold whose ansible-playbook was killed stops at the next check, not at the end of the hold."""
    with switch(live="blue") as env:
        split(env, 10)
        params = dict(
            BASE, url=env.url, seconds=60.0, max_seconds=60.0, stable=None, sticky_header="X-Sovereign-Key",
            golden=None, max_error_ratio=0.01, max_p99_ratio=0, p99_tolerance_ms=10, queries=[], request_timeout=5,
            prometheus_url=None, prometheus_host=None, prometheus_scrape_interval=15, prometheus_timeout=5,
        )  # fmt: skip
        calls = []
        with pytest.raises(canary_analysis.ControllerGone):
            canary_analysis.analyse(params, gone=lambda: calls.append(1) or len(calls) >= 2)
        assert len(calls) == 2  # checked once a second while probing: stopped after about 2 s of a 60 s hold
