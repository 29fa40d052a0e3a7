"""playbooks/experiment.yml refuses bad input before it reads or changes anything: a real `ansible-playbook` on a
localhost inventory (group inference) with bad -e values; each run must fail at the first check, naming the
problem, with no task after it run. (Unknown versions and colors that do not serve an arm are checked against real
runtimes in molecule/release/tests/test_progressive_experiment.py, run by molecule/release.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK = ROOT / "playbooks" / "experiment.yml"
GOOD = {
    "experiment_name": "ab-1",
    "experiment_model_a": "models:/churn/3",
    "experiment_model_b": "models:/churn/4",
    "experiment_split": 50,
}

CASES = [
    ("split 0", {"experiment_split": 0}, 'experiment_split="0" (percent of requests to arm B, 1-99)'),
    ("split 150", {"experiment_split": 150}, 'experiment_split="150"'),
    ("split not a number", {"experiment_split": "half"}, 'experiment_split="half"'),
    ("alias, not a version", {"experiment_model_b": "models:/churn@champion"}, "each models:/NAME/VERSION"),
    ("no name", {"experiment_name": ""}, 'experiment_name=""'),
    ("bad duration", {"experiment_duration_s": -5}, 'experiment_duration_s="-5"'),
    ("same version twice", {"experiment_model_b": "models:/churn/3"}, "Both arms are models:/churn/3"),
    ("two models", {"experiment_model_b": "models:/fraud/4"}, "The arms serve different models (churn and fraud)"),
    ("unknown action", {"experiment_action": "pause"}, 'experiment_action="pause": it must be start'),
    (
        "bad minimum per host",
        {"experiment_min_samples_per_host": "some"},
        'experiment_min_samples_per_host="some" (>= 0)',
    ),
    ("bad expiry grace", {"experiment_expire_grace_s": -1}, 'experiment_expire_grace_s="-1" (>= 0 seconds)'),
]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@pytest.mark.parametrize(("extra", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_first_and_names_the_problem(tmp_path, extra, message):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        json.dumps(
            {
                "inference": {
                    "hosts": {"h1": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}
                }
            }
        )
    )
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_STDOUT_CALLBACK": "default",
    }
    cmd = [_tool("ansible-playbook"), "-i", str(inventory), str(PLAYBOOK), "-e", json.dumps({**GOOD, **extra})]
    cmd += ["-e", json.dumps({"experiment_report_dir": str(tmp_path / "report")})]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert message in out, out
    assert "Nothing was changed." in out
    assert "Read the host contract" not in out  # failed before reading (or changing) anything on the host
    assert not (tmp_path / "report").exists()
