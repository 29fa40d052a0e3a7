"""scripts/ab_test.py (the seed's `scripts/ab_test.py --model-a v2 --model-b v1`): its arguments become
playbooks/experiment.yml's, a duration over one week is refused before anything runs, and a real run hands bad input
to the real playbook, which refuses it first (localhost inventory, as test_experiment_input.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "ab_test.py"


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def extra_of(*args):
    out = run("-i", "inv", *args, "--print")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[1:4] == ["-i", "inv", str(ROOT / "playbooks" / "experiment.yml")] and cmd[4] == "-e"
    return json.loads(cmd[5])


def test_the_seed_command_line_becomes_the_playbook_s():
    extra = extra_of("--model", "churn", "--model-a", "v2", "--model-b", "v1", "--duration", "3d", "--split", "10")
    assert extra == {
        "experiment_name": "churn-2-1",
        "experiment_model_a": "models:/churn/2",
        "experiment_model_b": "models:/churn/1",
        "experiment_split": 10,
        "experiment_duration_s": 3 * 86400,
        "experiment_min_samples": 0,
        "experiment_tracking_uri": "",
    }
    assert (
        extra_of("--model-a", "models:/fraud/4", "--model-b", "models:/fraud/5", "--name", "f")["experiment_name"]
        == "f"
    )
    assert extra_of("--stop") == {"experiment_action": "stop"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m", "--model-a", "1", "--model-b", "2", "--duration", "8d"], "at most one week (7d)"),
        (["--model", "m", "--model-a", "1", "--model-b", "2", "--duration", "soon"], "is not a duration"),
        (["--model-a", "1", "--model-b", "2"], "--model-a '1' is a bare version: give --model NAME"),
        (["--model", "m", "--model-a", "1"], "--model-a and --model-b are both needed"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(args, message):
    out = run("-i", "inv", *args, "--print")
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_a_real_run_reaches_the_playbook_which_refuses_bad_input(tmp_path):
    inventory = tmp_path / "hosts.yml"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory.write_text(json.dumps({"inference": {"hosts": {"h1": host}}}))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    out = run("-i", str(inventory), "--model", "churn", "--model-a", "3", "--model-b", "4", "--split", "0", env=env)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert 'experiment_split="0"' in text and "Nothing was changed." in text, text
