"""A/B experiments end to end (issue 14): playbooks/experiment.yml against one real host (two sovereign-runtime colors
on CPU behind the real HAProxy; molecule/release's converge), the report read from the files it leaves on the
controller.

Marked progressive: molecule/release runs it after test_progressive.py (file order), on one converge
(conftest.py). Each test starts from blue live with demo version 1, no split (the blue_live_v1 fixture; the file
before this one leaves it so), and arm B, version 2, on green (idle): the state an operator sets up with deploy.yml
and rollback.yml. ensure_arms() puts version 2 on green when it is not there, by rewriting green's model file and
restarting it (what a deploy does before it switches; the release flow itself is tested in test_progressive.py and
molecule/release). Traffic: files/experiment_load.py on the host (the converge copies it), keep-alive clients through
the frontend, a fresh sticky key per request, and an outcome posted to POST /v2/outcomes for every answer's request
id, planted by model version at an exact rate. So a planted difference must give the right winner, and equal rates
must give none. Bad input against the real runtimes (a version no color serves) must fail before anything changes.
Small samples (a few hundred per arm) keep the scenario short; the difference planted is large enough for them. The
split itself is a fair hash of random keys, so the report's sample-ratio-mismatch check (p < 0.001) flags it in about
1 run in 1000 by chance.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import playbook

pytestmark = [pytest.mark.progressive, pytest.mark.usefixtures("blue_live_v1")]

MODELS = "/var/lib/sovereign/models"
FACT = "/etc/ansible/facts.d/sovereign.fact"
LOAD = "/usr/local/lib/sovereign-experiment-load.py"
BASE = {
    "experiment_model_a": "models:/demo/1",
    "experiment_model_b": "models:/demo/2",
    "experiment_split": 50,
    "experiment_duration_s": 120,
    "experiment_min_samples": 200,
    "experiment_poll_s": 1,
}


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def play(extra):
    """playbooks/experiment.yml with EXTRA; returns (rc, output with whitespace collapsed and no colors: molecule
    forces Ansible's colors, which it sets line by line, so a message wrapped over lines has codes inside it)."""
    rc, out, _seconds = playbook.play("experiment.yml", extra)
    return rc, " ".join(ANSI.sub("", out).split())


def contract(host):
    return json.loads(host.file(FACT).content_string)


def served(host, color):
    spec = contract(host)["runtime"]["colors"][color]
    out = host.run(f"curl -sf http://{spec['host']}:{spec['port']}/v2/models/demo")
    return json.loads(out.stdout)["versions"][0] if out.rc == 0 else None


def recording(host, color):
    """What COLOR's runtime says it records now (GET /v2/experiment)."""
    spec = contract(host)["runtime"]["colors"][color]
    return json.loads(host.check_output(f"curl -sf http://{spec['host']}:{spec['port']}/v2/experiment"))


def map_entries(host):
    path = contract(host)["traffic_switch"]["map_file"]
    lines = host.file(path).content_string.splitlines()
    return dict(line.split()[:2] for line in lines if line.strip() and not line.startswith("#"))


def put(host, color, version):
    """COLOR serves demo VERSION: its model file rewritten, the color restarted, until it answers with that version."""
    if served(host, color) == version:
        return
    env = contract(host)["runtime"]["colors"][color]["model_env"]
    text = (
        f"SOVEREIGN_RUNTIME_MODEL_URI={MODELS}/v{version}/model.pt\nSOVEREIGN_RUNTIME_MODEL_NAME=demo\n"
        f"SOVEREIGN_RUNTIME_MODEL_VERSION={version}\n"
    )
    host.check_output(f"printf '%s' '{text}' > {env} && systemctl restart sovereign-runtime@{color}")
    deadline = time.monotonic() + 120
    while served(host, color) != version:
        assert time.monotonic() < deadline, f"{color} did not come up with version {version}"
        time.sleep(1)


def ensure_arms(host):
    """Blue live with version 1, green with version 2 (idle)."""
    put(host, "green", "2")
    assert served(host, "blue") == "1", "the converge leaves version 1 on blue"
    assert map_entries(host).get(contract(host)["traffic_switch"]["map_key"]) == "blue"


def experiment(host, tmp_path, name, rates):
    """Run experiment NAME under planted-outcome load; returns (report, load result, map entries after)."""
    ensure_arms(host)
    stop, out = f"/tmp/{name}.stop", f"/tmp/{name}.json"
    host.check_output(f"rm -f {stop} {out}; systemctl reset-failed sovereign-{name} 2>/dev/null || true")
    host.check_output(
        f"systemd-run --unit sovereign-{name} --collect /usr/bin/python3 {LOAD} http://127.0.0.1:8000 demo 2 "
        f"{rates} 400 {stop} {out}"
    )
    try:
        rc, text = play({**BASE, "experiment_name": name, "experiment_report_dir": str(tmp_path / name)})
    finally:
        host.check_output(f"touch {stop}")
    deadline = time.monotonic() + 60
    while not host.file(out).exists:
        assert time.monotonic() < deadline, "the load generator did not finish"
        time.sleep(0.5)
    load = json.loads(host.file(out).content_string)
    assert rc == 0, text[-3000:]
    report = json.loads((tmp_path / name / "report.json").read_text())
    assert (tmp_path / name / "chart.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / name / "report.txt").read_text().splitlines()
    verdicts = [line for line in table if line.startswith("verdict:")]
    assert verdicts == [f"verdict: {report['verdict']}"], verdicts
    return report, load, map_entries(host)


def check_common(report, load, entries):
    a, b = report["arms"]
    assert (a["arm"], a["color"], a["version"]) == ("A", "blue", "1")
    assert (b["arm"], b["color"], b["version"]) == ("B", "green", "2")
    assert load["failures"] == 0, load["errors"]
    assert a["requests"] >= 150 and b["requests"] >= 150  # min_samples 200 per arm, or the duration ran out
    assert a["errors"] == b["errors"] == 0
    assert a["outcomes"] >= 0.95 * a["requests"] and b["outcomes"] >= 0.95 * b["requests"]
    assert not report["srm"]["mismatch"], report["srm"]
    # Afterwards all traffic is back on the live color: no split left in the map.
    assert entries.get("live") == "blue" and int(entries.get("weight", 0)) == 0


def test_unknown_version_fails_before_anything_changes(host, tmp_path):
    ensure_arms(host)
    before = map_entries(host)
    dirs = [c["experiment_dir"] for c in contract(host)["runtime"]["colors"].values()]
    rc, text = play({**BASE, "experiment_name": "bad", "experiment_model_b": "models:/demo/9",
                     "experiment_report_dir": str(tmp_path / "bad")})  # fmt: skip
    assert rc != 0 and "version 9 (arm B) must each be served" in text and "Nothing was changed." in text
    assert map_entries(host) == before
    assert not any(host.file(f"{d}/experiment.json").exists for d in dirs)


def test_planted_difference_reports_the_right_winner(host, tmp_path):
    report, load, entries = experiment(host, tmp_path, "planted", "1=0.2,2=0.5")
    check_common(report, load, entries)
    a, b = report["arms"]
    assert report["verdict"] == "B better", report["verdict_reason"]
    assert report["comparison"]["method"] == "two-proportion z-test" and report["comparison"]["p_value"] < 0.001
    assert abs(a["metric"]["mean"] - 0.2) < 0.02 and abs(b["metric"]["mean"] - 0.5) < 0.02


def test_no_difference_reports_none(host, tmp_path):
    report, load, entries = experiment(host, tmp_path, "same", "1=0.3,2=0.3")
    check_common(report, load, entries)
    assert report["verdict"] == "no detectable difference at this sample size", report["verdict_reason"]
    lo, hi = report["comparison"]["ci"]
    assert lo < 0 < hi


def test_a_killed_experiment_is_ended_by_action_stop(host, tmp_path):
    """SIGTERM to ansible-playbook (what Ctrl-C or a CI timeout sends; Ansible runs no always: task then, nor on
    SIGKILL) while experiment.yml holds a 600 s experiment: what the user finds is both colors still recording it,
    HAProxy still splitting and the fleet lock held. `experiment.yml -e experiment_action=stop` ends it: it breaks the
    dead run's lock, ends the recording on both colors, removes their experiment.json, puts all traffic back on the
    live color, releases the lock and says what it stopped; the killed run's hold job on the host ends too. (Left
    alone, each runtime stops recording by itself at the experiment's expiry, its planned end plus
    experiment_expire_grace_s: tests/unit/runtime/test_experiment.py.)"""
    ensure_arms(host)
    colors = contract(host)["runtime"]["colors"]
    dirs = [colors[c]["experiment_dir"] for c in ("blue", "green")]
    extra = {**BASE, "experiment_name": "killed", "experiment_duration_s": 600, "experiment_min_samples": 0,
             "experiment_report_dir": str(tmp_path / "killed")}  # fmt: skip
    proc = subprocess.Popen(
        playbook.command("experiment.yml", extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not (
            any("Hold the experiment" in line for line in lines)
            and all(recording(host, c)["experiment"] == "killed" for c in ("blue", "green"))
        ):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "the experiment's hold never started:\n" + "".join(lines)[-4000:]
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
    assert proc.returncode == -signal.SIGTERM, "".join(lines)[-3000:]
    # What the killed run left: the split, both colors recording, the lock.
    assert map_entries(host)["weight"] == "50"
    assert all(host.file(f"{d}/experiment.json").exists for d in dirs)
    assert all(recording(host, c)["experiment"] == "killed" for c in ("blue", "green"))
    assert host.file("/var/lib/sovereign/deploy.lock").exists

    rc, text = play({"experiment_action": "stop"})
    assert rc == 0, text[-3000:]
    assert "stopped experiment(s) killed" in text and "the split (50 % to green) removed: all traffic on blue" in text
    assert "breaking the fleet deploy lock" in text and "that ansible-playbook is no longer running" in text
    entries = map_entries(host)
    assert entries["live"] == "blue" and int(entries.get("weight", 0)) == 0
    assert not any(host.file(f"{d}/experiment.json").exists for d in dirs)
    assert all(recording(host, c)["experiment"] is None for c in ("blue", "green"))
    assert not host.file("/var/lib/sovereign/deploy.lock").exists
    # The killed run's hold (an async job on the host) sees the experiment gone and ends.
    # ("[e]": the pattern does not match the shell that runs pgrep, whose command line holds it.)
    deadline = time.monotonic() + 60
    while host.run("pgrep -f '[e]xperiment-wait[.]py'").rc == 0:
        assert time.monotonic() < deadline, host.run("pgrep -af '[e]xperiment-wait[.]py'").stdout
        time.sleep(0.5)
    # Stopping again finds nothing to stop and changes nothing.
    rc, text = play({"experiment_action": "stop"})
    assert rc == 0 and "no experiment was recording" in text and "all traffic on blue" in text, text[-3000:]
