"""Progressive delivery end to end (issue 14): playbooks/deploy.yml -e strategy=canary and rollback.yml against one
real host (sovereign-runtime on CPU with real TorchScript models behind the real HAProxy; molecule/release's converge).
Marked progressive: molecule/release runs it first, before test_progressive_experiment.py and test_release.py, on
one converge (conftest.py).

The playbooks run as real `ansible-playbook` processes against molecule's inventory; the host is read through
testinfra's podman backend; the load runs on the host (files/progressive_load.py, keep-alive clients through the
frontend, each answer's color and model version recorded with its time). Tests run in file order and share the host:
bad input first (nothing may change), then a canary of v2 on green that steps through its weights (from blue live
with v1, no split: the blue_live_v1 fixture), then a degraded canary of blue that must abort at its first analysis,
then a canary killed mid-way, rolled back, and re-run: it leaves blue live with v1 and no split, where the tests after
this file start.

No GPU here: the runtime runs on CPU. The latency limits are loosened for a small shared machine (stated per test);
the degraded canary's +1500 ms chaos latency is far above them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils._haproxy import arm_of

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
from playbook import command, play

pytestmark = pytest.mark.progressive

MODELS = "/var/lib/sovereign/models"
LEDGER = "/var/lib/sovereign/deployments.jsonl"
LOCK = "/var/lib/sovereign/deploy.lock"
FACT = "/etc/ansible/facts.d/sovereign.fact"
LOAD = "/usr/local/lib/sovereign-progressive-load.py"

# Loosened for a small shared machine (production defaults: smoke p99 50 ms, watch 30 s / 100 ms, hold 30 s).
FAST = {
    "deploy_smoke_requests": 10,
    "deploy_smoke_max_p99_ms": 1000,
    "deploy_watch_seconds": 4,
    "deploy_watch_max_p99_ms": 1000,
    "deploy_drain_timeout_s": 5,
    "deploy_canary_hold_s": 4,
    "deploy_canary_max_hold_s": 12,
    "deploy_canary_interval_s": 0.01,
    "deploy_canary_min_requests": 10,
    # The analysis compares the canary with the stable arm (p99_vs_stable: at most 3 x the stable p99 or 500 ms above
    # it) and holds both to an absolute limit. Loosened for the shared 2-core machine: on the first run (load ~20,
    # 2026-12-01) a healthy stable arm's p99 was 144 ms and a freshly started healthy canary's 334 ms, so the
    # production limits (100 ms, x1.5 / +10 ms) failed a good canary. The degraded canary (below) gets +1500 ms on
    # every request from the runtime's chaos knob: its p99 is at least 1500 ms whatever the load, above the 1000 ms.
    "deploy_canary_max_p99_ms": 1000,
    "deploy_canary_max_p99_ratio": 3,
    "deploy_canary_p99_tolerance_ms": 500,
}
CHAOS_MS = 1500  # the degraded canary's extra latency per request
ANALYSIS_50 = "Analyse the canary against the live color - 50%"  # the analysis task's name, as the playbook prints it
# A pipelined module's process on the host (its command line is the bare interpreter; the load and the runtimes
# run scripts).
MODULE_PATTERN = "'^/usr/bin/python3(\\.[0-9.]+)?$'"
MODULE_PROCESS = f"pgrep -f {MODULE_PATTERN}"
V2 = {"model": f"{MODELS}/v2/model.pt", "model_version": "2"}
V1 = {"model": f"{MODELS}/v1/model.pt", "model_version": "1"}


_WHERE = {}


def where(host):
    """The map file and admin socket as the host contract says (the converge sets a non-default map file)."""
    if host.backend.name not in _WHERE:
        fact = json.loads(host.file(FACT).content_string)
        switch = fact["traffic_switch"]
        colors = fact["runtime"]["colors"]
        _WHERE[host.backend.name] = dict(
            map_file=switch["map_file"],
            admin_socket=switch["admin_socket"],
            model_env={c: colors[c]["model_env"] for c in ("blue", "green")},
        )
    return _WHERE[host.backend.name]


def split(host):
    """{live, canary, weight} as the running HAProxy routes (its runtime map, through the admin socket)."""
    w = where(host)
    script = (
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{w['admin_socket']}'); "
        f"s.sendall(b'show map {w['map_file']}\\n'); print(s.makefile().read())"
    )
    out = {}
    for line in host.check_output(f'python3 -c "{script}"').splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[parts[1]] = parts[2]
    return out


def file_entries(host):
    text = host.file(where(host)["map_file"]).content_string
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def ledger(host):
    f = host.file(LEDGER)
    return [json.loads(line) for line in f.content_string.splitlines() if line.strip()] if f.exists else []


def snapshot(host):
    """Everything a refused deploy must leave alone."""
    return dict(
        map=host.file(where(host)["map_file"]).content_string,
        runtime=split(host),
        envs={c: host.file(p).content_string for c, p in where(host)["model_env"].items()},
        started={
            c: host.check_output(f"systemctl show -p ActiveEnterTimestampMonotonic --value sovereign-runtime@{c}")
            for c in ("blue", "green")
        },
        ledger_lines=len(ledger(host)),
        lock=host.file(LOCK).exists,
    )


class Load:
    """files/progressive_load.py on the host as a transient unit: 3 keyless keep-alive clients and one that cycles
    through 40 sticky keys, until stop() (or 600 s)."""

    def __init__(self, host, name):
        self.host, self.name = host, name
        host.check_output(f"rm -f /tmp/{name}.stop /tmp/{name}.json; systemctl reset-failed sovereign-{name} || true")
        host.check_output(
            f"systemd-run --unit sovereign-{name} --collect /usr/bin/python3 {LOAD} http://127.0.0.1:8000 demo 3 40 "
            f"600 /tmp/{name}.stop /tmp/{name}.json"
        )

    def stop(self):
        self.host.check_output(f"touch /tmp/{self.name}.stop")
        deadline = time.monotonic() + 120
        while not self.host.file(f"/tmp/{self.name}.json").exists:
            assert time.monotonic() < deadline, self.host.run(f"journalctl -u sovereign-{self.name} -n 30").stdout
            time.sleep(0.2)
        return json.loads(self.host.file(f"/tmp/{self.name}.json").content_string)


def canary_extra(color, model, **more):
    return {"color": color, **model, "strategy": "canary", **FAST, **more}


# -- bad input changes nothing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({"deploy_canary_steps": [5, 150, 100]}, "weight(s) 150 outside 1-100", id="weight-outside-0-100"),
        pytest.param({"deploy_canary_steps": [5, 25, 50]}, "does not end at 100", id="steps-not-ending-at-100"),
        pytest.param({"deploy_canary_steps": [50, 25, 100]}, "is not strictly increasing", id="steps-not-increasing"),
        pytest.param({"strategy": "sideways"}, "Unknown strategy 'sideways'", id="unknown-strategy"),
        pytest.param(
            {"strategy": None, "deploy_strategy": "sideways"},
            "value of deploy_strategy must be one of: blue_green, canary, got: sideways",
            id="unknown-deploy_strategy",
        ),
        pytest.param(
            {"deploy_canary_queries": [{"name": "x", "query": "up", "max": 1}]},
            "deploy_canary_queries needs a Prometheus",
            id="queries-without-prometheus",
        ),
    ],
)
def test_bad_input_changes_nothing(host, extra, expected):
    before = snapshot(host)
    args = canary_extra("green", V2, **extra)
    if args.get("strategy") is None:
        args.pop("strategy")
    rc, out, _seconds = play("deploy.yml", args)
    assert rc != 0
    assert expected in out, out[-3000:]
    if "Validation of arguments failed" not in out:
        assert "Nothing was changed" in out
    assert snapshot(host) == before


# -- a canary that steps through its weights -------------------------------------------------------------------------


def _binomial_tolerance(n, p):
    """4 standard deviations of a share over n requests, plus 2 points for the step edges."""
    return 4 * math.sqrt(max(p * (1 - p), 0.0025) / max(n, 1)) + 0.02


@pytest.mark.usefixtures("blue_live_v1")
def test_canary_steps_through_its_weights_under_load(host):
    """v2 to green, steps 5, 25, 50 (held 4 s, analysed) then 100: not one failed request; during each step the
    keyless requests' share of green is the weight within a binomial tolerance; every sticky key stays on the arm the
    hash gives it for that weight, and only ever moves from blue to green; every answer names its color and model
    version."""
    assert split(host)["live"] == "blue"
    load = Load(host, "canary")
    try:
        rc, out, seconds = play("deploy.yml", canary_extra("green", V2))
    finally:
        report = load.stop()
    assert rc == 0, out[-4000:]
    print(f"canary deploy {seconds:.1f}s; load: {report['requests']} requests, {report['failures']} failures")
    assert report["failures"] == 0, report["samples"]
    record = ledger(host)[-1]
    assert record["result"] == "success" and record["strategy"] == "canary" and record["color"] == "green"
    steps = record["canary"]
    assert [s["weight"] for s in steps] == [5, 25, 50]
    assert all(s["verdict"] == "pass" and s["source"] == "probes" for s in steps), steps
    for step in steps:
        lo, hi, weight = step["started"], step["ended"], step["weight"] / 100.0
        window = [c for t, c, _v in report["keyless"] if lo <= t <= hi]
        share = window.count("green") / len(window)
        tol = _binomial_tolerance(len(window), weight)
        print(
            f"step {step['weight']}%: {len(window)} keyless requests, green share {share:.3f} (tolerance {tol:.3f}); "
            f"analysis: canary {step['canary']}, stable {step['stable']}"
        )
        assert len(window) >= 50, f"too little load in step {step['weight']}% to measure a share"
        assert abs(share - weight) <= tol, (step, share, tol)
        keyed = [(k, c) for t, k, c in report["keyed"] if lo <= t <= hi]
        assert keyed, "no sticky request in the step"
        for key, color in keyed:
            assert color == arm_of(key, "blue", "green", step["weight"]), (step["weight"], key, color)
    # Across the whole canary a key moves at most once, blue to green.
    for key in {k for _t, k, _c in report["keyed"]}:
        colors = [c for _t, k, c in report["keyed"] if k == key]
        assert colors == sorted(colors), (key, colors)  # "blue" < "green": never back
    # Each answer names its arm and model version: v1 on blue, v2 on green.
    versions = {(c, v) for _t, c, v in report["keyless"]}
    assert versions == {("blue", "1"), ("green", "2")}, versions
    assert split(host) == {"live": "green", "canary": "green", "weight": "0"}
    assert file_entries(host) == {"live": "green", "canary": "green", "weight": "0"}


# -- a degraded canary aborts at its first analysis ------------------------------------------------------------------


def test_degraded_canary_aborts_at_the_first_analysis_and_loses_no_request(host):
    """blue gets v1 with the runtime's chaos knob (+1500 ms per request; the smoke test's limit is raised above it so
    the canary starts): the 5 % analysis fails on p99 (the 1000 ms limit, whatever the load: every canary request
    takes at least 1500 ms; and 3 x / +500 ms over the stable p99), every request is back on green within seconds,
    the play fails naming the measurement, the ledger records the step - and no client request fails."""
    records = len(ledger(host))
    load = Load(host, "degraded")
    try:
        rc, out, _seconds = play(
            "deploy.yml",
            canary_extra(
                "blue",
                V1,
                deploy_model_extra_env={"SOVEREIGN_RUNTIME_CHAOS_LATENCY_MS": CHAOS_MS},
                # The smoke test lets the slow canary start (2 requests of >= 1.5 s); the analysis judges it on 3
                # requests of each arm (each canary probe takes >= 1.5 s, so the p99 of any 3 is >= 1500 ms: more
                # would only hold longer), holding up to 60 s to get them.
                deploy_smoke_requests=2,
                deploy_smoke_max_p99_ms=10000,
                deploy_canary_min_requests=3,
                deploy_canary_max_hold_s=60,
            ),
        )
    finally:
        report = load.stop()
    assert rc != 0
    assert "canary 5%: canary analysis failed: canary p99" in out, out[-4000:]
    assert "vs limit 1000 ms" in out and "traffic switched back to green" in out
    assert report["failures"] == 0, report["samples"]
    new = ledger(host)[records:]
    assert len(new) == 1 and new[0]["result"] == "failed" and new[0]["switched_back"] is True
    (step,) = new[0]["canary"]
    assert step["weight"] == 5 and step["verdict"] == "fail"
    assert any(d.startswith("canary p99") for d in step["failed_checks"]), step
    assert split(host) == {"live": "green", "canary": "blue", "weight": "0"}
    assert file_entries(host)["weight"] == "0"
    # "At once": the next tasks are the rescue's switch back (weight 0 is its first command). No keyless answer from
    # blue later than 20 s after the analysis ended: on the loaded test machine one Ansible task took up to 6.5 s
    # (first run), and an in-flight request on blue has 1.5 s of chaos latency left.
    last_blue = max((t for t, c, _v in report["keyless"] if c == "blue"), default=step["started"])
    print(f"last answer from the aborted canary {last_blue - step['ended']:.1f}s after its analysis ended")
    assert last_blue - step["ended"] < 20.0, (last_blue, step)
    assert not host.file(LOCK).exists


# -- rollback during a canary; a re-run after a kill ---------------------------------------------------------------


def test_rollback_during_a_killed_canary_then_rerun(host):
    """A canary of blue (v1) held at 50 % is SIGKILLed while its analysis runs (ansible-playbook's process group;
    Ansible's worker has detached from it): HAProxy keeps the split and the lock stays, and the killed run's
    analysis stops probing the host - within seconds of the kill, not at the end of its 600 s hold (the module's
    action plugin ends the orphaned worker, the module sees its stdout closed). rollback.yml breaks the dead run's
    lock and puts every request back on green (the live color) without restarting anything; the same deploy run
    again converges to blue. Under load: no failed request."""
    held = dict(deploy_canary_steps=[50, 100], deploy_canary_hold_s=600, deploy_canary_max_hold_s=600)
    extra = canary_extra("blue", V1, **held)
    load = Load(host, "killed")
    try:
        proc = subprocess.Popen(
            command("deploy.yml", extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        # The analysis at 50 % runs: its task has started (the playbook says so) and its module process is up.
        deadline = time.monotonic() + 240
        while not (any(ANALYSIS_50 in line for line in lines) and host.run(MODULE_PROCESS).rc == 0):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "the canary's analysis at 50 % never started"
            time.sleep(0.5)
        assert split(host)["weight"] == "50"
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(30)
        reader.join(10)
        # Nothing of the killed run probes on: its module process ends (bounded wait, 600 s of hold left). One left
        # over fails the test, and is killed so that it does not skew the tests after this one.
        deadline = killed + 120
        while host.run(MODULE_PROCESS).rc == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"the killed analysis was gone {time.monotonic() - killed:.1f}s after the kill (polled every 0.5 s)")
        left = host.run(f"pgrep -af {MODULE_PATTERN}").stdout
        if left:
            processes = host.run("ps -eo pid,ppid,etime,args").stdout
            host.run(f"pkill -9 -f {MODULE_PATTERN}")
            pytest.fail(f"the killed run's analysis still runs 120 s after the kill: {left}\n{processes}")
        assert split(host) == {"live": "green", "canary": "blue", "weight": "50"}
        assert host.file(LOCK).exists
        green_started = "systemctl show -p ActiveEnterTimestampMonotonic --value sovereign-runtime@green"
        started_before = host.check_output(green_started)

        rc, out, seconds = play("rollback.yml", {"rollback_smoke_max_p99_ms": 1000})
        assert rc == 0, out[-4000:]
        print(f"rollback during the canary: {seconds:.1f}s")
        assert split(host)["weight"] == "0" and split(host)["live"] == "green"
        assert file_entries(host)["weight"] == "0"
        record = ledger(host)[-1]
        assert record["action"] == "rollback" and record["result"] == "success" and record["color"] == "green"
        assert "a canary split sent 50% of the requests to blue" in record["reason"]
        assert host.check_output(green_started) == started_before
        assert not host.file(LOCK).exists

        rc, out, _seconds = play("deploy.yml", dict(extra, deploy_canary_hold_s=4, deploy_canary_max_hold_s=12))
        assert rc == 0, out[-4000:]
    finally:
        report = load.stop()
    assert report["failures"] == 0, report["samples"]
    assert split(host) == {"live": "blue", "canary": "blue", "weight": "0"}
    record = ledger(host)[-1]
    assert record["result"] == "success" and [s["weight"] for s in record["canary"]] == [50]
