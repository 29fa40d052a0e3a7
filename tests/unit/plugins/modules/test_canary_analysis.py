# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""canary_analysis through a real haproxy (the role's template) splitting between two OIP servers, and a real
Prometheus for the Prometheus source (skipped, saying so, where the binaries are missing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ansible_collections.sovereign.mlops.plugins.modules import canary_analysis
from ansible_collections.sovereign.mlops.plugins.plugin_utils import _controller_watch as canary_watch
from ansible_collections.sovereign.mlops.tests.unit.plugins.module_utils.prometheus_fixture import (
    PrometheusProcess,
    RuntimeMetrics,
    drive,
    needs_prometheus,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    needs_haproxy,
    run_module,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.test_release_watch import switch
from ports import free_port

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
    """Under max_p99_ms but far above 1.5x the stable p99: 300 ms, so that a loaded machine's jitter on the stable
    arm (tens of ms at load 15) cannot lift its bound past the canary (a 40 ms canary passed there once)."""
    with switch(live="blue", green_mode="slow", green_slow=0.3) as env:
        split(env, 10)
        result = analyse(env, capsys, seconds=3, max_seconds=3, min_requests=5)
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


# -- the action plugin: a killed ansible-playbook leaves no analysis probing ----------------------------------------

needs_playbook = pytest.mark.skipif(
    shutil.which("ansible-playbook", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]) is None,
    reason="ansible-playbook is not installed",
)
ROOT = Path(__file__).resolve().parents[4]


def _marked(marker):
    """PIDs of this machine's processes whose environment holds MARKER (a run's every process inherits it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0"):
            found.append(int(entry))
    return found


def _probes(server):
    """The analysis's inference requests a server got (HAProxy's health checks are GETs)."""
    return sum(1 for method, _path in list(server.requests) if method == "POST")


def _wait_gone(marker, seconds):
    """Wait until no process holds MARKER; returns those left at the deadline ([] when all ended)."""
    deadline = time.monotonic() + seconds
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_controller_watch_ends_a_worker_whose_parent_was_killed(tmp_path):
    """ControllerWatch for real, without Ansible: a parent forks a detached worker (setsid, as Ansible's
    WorkerProcess) that runs a stand-in module (canary_analysis.controller_gone() on its stdout pipe, a 600 s
    deadline) through a shell under the watch. SIGKILL of the parent alone: the worker ends its child (the shell)
    and itself, the module sees its pipe closed and says so. Without the watch the worker would wait for the
    module's 600 s."""
    marker = f"SOVEREIGN_WATCH_TEST={tmp_path.name}"
    out = tmp_path / "module.out"
    module = (
        "import sys, time\n"
        "from ansible_collections.sovereign.mlops.plugins.modules import canary_analysis as ca\n"
        "deadline = time.monotonic() + 600\n"
        "while not ca.controller_gone() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        f"open({str(out)!r}, 'w').write('gone' if time.monotonic() < deadline else 'deadline')\n"
    )
    parent = (
        f"import os, subprocess, sys, time\nMODULE = {module!r}\n"
        "from ansible_collections.sovereign.mlops.plugins.plugin_utils._controller_watch import ControllerWatch\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    with ControllerWatch(interval=0.1):\n"
        # As Ansible's local connection runs a module: a shell that waits for it, its stdout a pipe to the worker.
        "        argv = ['/bin/sh', '-c', '\"$0\" -c \"$1\" && sleep 0', sys.executable, MODULE]\n"
        "        subprocess.run(argv, stdout=subprocess.PIPE, check=False)\n"
        "    os._exit(0)\n"
        "time.sleep(3600)\n"
    )
    env = dict(os.environ, SOVEREIGN_WATCH_TEST=tmp_path.name)
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_marked(marker)) < 4:  # parent, worker, shell, module
            assert proc.poll() is None and time.monotonic() < deadline, _marked(marker)
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = _wait_gone(marker, 120)
        assert not left, f"processes of the killed run still alive: {left}"
        assert out.read_text() == "gone"
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_controller_watch_leaves_a_living_parents_worker_alone():
    """While the parent lives the watch never calls on_gone; leaving the block stops the thread."""
    calls = []
    with canary_watch.ControllerWatch(interval=0.01, on_gone=lambda: calls.append(1)) as watch:
        time.sleep(0.2)
        assert not watch.gone()
    assert calls == [] and not watch._thread.is_alive()  # pylint: disable=protected-access


@needs_haproxy
@needs_playbook
def test_a_killed_ansible_playbook_leaves_no_analysis_probing(tmp_path):
    """On-call SIGKILLs ansible-playbook during a canary's hold. Ansible's worker detaches from it and lives on,
    holding the module's pipes: without the action plugin's watch the module probed the host for the rest of its
    hold (molecule/progressive, 2026-12-01). Real: haproxy splitting 10 % to green, two OIP servers, a real
    ansible-playbook on localhost running canary_analysis with a 600 s hold; once both arms are probed, SIGKILL of
    ansible-playbook alone. Then every process of the run ends (the worker, its shell, the module) and the probes
    stop, long before the hold would."""
    marker = f"SOVEREIGN_KILL_TEST={tmp_path.name}"
    with switch(live="blue") as env:
        split(env, 10)
        task = dict(url=env.url, canary="green", weight=10, model_name="double", seconds=600, max_seconds=600,
                    interval=0.02, min_requests=10, max_p99_ms=1000)  # fmt: skip
        play = [{"hosts": "localhost", "connection": "local", "gather_facts": False,
                 "tasks": [{"name": "Analyse", "sovereign.mlops.canary_analysis": task}]}]  # fmt: skip
        (tmp_path / "play.yml").write_text(json.dumps(play))
        run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
        run_env.update(
            SOVEREIGN_KILL_TEST=tmp_path.name,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_LOCALHOST_WARNING="false",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
            ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
            PATH=str(Path(sys.executable).parent) + os.pathsep + run_env.get("PATH", ""),
        )
        cmd = ["ansible-playbook", "-i", "localhost,", str(tmp_path / "play.yml")]
        with open(tmp_path / "output", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while _probes(env.green) < 5 or _probes(env.blue) < 5:
                assert proc.poll() is None, (tmp_path / "output").read_text()[-3000:]
                assert time.monotonic() < deadline, "the analysis never probed both arms"
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            left = _wait_gone(marker, 120)
            assert not left, f"processes of the killed run still alive: {left}"
            seen = _probes(env.green) + _probes(env.blue)
            time.sleep(1)  # not a timing assertion: with no process left, nothing can probe any more
            assert _probes(env.green) + _probes(env.blue) == seen
        finally:
            for pid in _marked(marker):
                os.kill(pid, signal.SIGKILL)
