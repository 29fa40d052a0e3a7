"""The inference_runtime role's entry point `metrics` (roles/inference_runtime/tasks/metrics.yml), run for real by
ansible-playbook on the controller (connection local) against a host contract in a temporary file: a color is a
scrape target once it has a model on the host, and from then on (docs/adr/1531-scrape-a-color-once-it-has-a-model.md).
The same tasks run at the end of the role and in a deploy, after it writes the color's model (roles/release).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ENTRY = {"name": "sovereign.mlops.inference_runtime", "tasks_from": "metrics"}
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
COLORS = {"blue": 8001, "green": 8002}


def endpoint(color: str) -> dict:
    return {
        "job": "sovereign_runtime",
        "address": "10.0.0.5",
        "port": COLORS[color],
        "path": "/metrics",
        "labels": {"color": color},
    }


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host: its runtime config dir (no model yet) and a contract that still has both colors published (what
    the role published before this rule) plus another section's endpoint."""
    (tmp_path / "cfg").mkdir()
    published = {f"sovereign_runtime_{c}": {**endpoint(c), "published_by": "runtime"} for c in COLORS}
    published["node_exporter"] = {"job": "node_exporter", "address": "10.0.0.5", "port": 9100, "published_by": "common"}
    (tmp_path / "sovereign.fact").write_text(json.dumps({"version": 1, "metrics": published}))
    return tmp_path


def run_metrics(host: Path, color_metrics: bool = True) -> dict:
    """Run the entry point once; returns whether it changed and the contract's metrics after it."""
    runtime = {"colors": {c: {"model_env": str(host / "cfg" / f"{c}.model.env")} for c in COLORS}}
    if color_metrics:
        runtime["color_metrics"] = {c: endpoint(c) for c in COLORS}
    play = [
        {
            "hosts": "all",
            "connection": "local",
            "gather_facts": False,
            "module_defaults": {
                "sovereign.mlops.host_contract": {"path": str(host / "sovereign.fact")},
                "ansible.builtin.setup": {"fact_path": str(host / "no-facts.d")},
            },
            "tasks": [
                {"ansible.builtin.include_role": ENTRY},
                {
                    "ansible.builtin.copy": {
                        "content": "{{ {'changed': __inference_runtime_metrics is changed} | to_json }}",
                        "dest": str(host / "result.json"),
                        "mode": "0600",
                    }
                },
            ],
        }
    ]
    (host / "play.yml").write_text(yaml.safe_dump(play))
    # ansible_local as an extra var: the contract the caller has read (the release role's, or contract.yml's).
    extra = {"ansible_python_interpreter": sys.executable, "ansible_local": {"sovereign": {"runtime": runtime}}}
    (host / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(host / "tmp")}  # fmt: skip
    cmd = [str(PLAYBOOK_BIN), "-i", "infer-01,", "-e", f"@{host / 'vars.json'}", str(host / "play.yml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    metrics = json.loads((host / "sovereign.fact").read_text())["metrics"]
    return {"changed": json.loads((host / "result.json").read_text())["changed"], "metrics": metrics}


def runtimes(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("sovereign_runtime_")}


def test_a_color_without_a_model_is_no_target(host):
    """A fresh host (no color deployed): neither color is published; the old rule's endpoints are withdrawn, the
    other sections' endpoints stay."""
    got = run_metrics(host)
    assert got["changed"] is True
    assert runtimes(got["metrics"]) == {}
    assert got["metrics"]["node_exporter"]["published_by"] == "common"


def test_a_color_is_a_target_once_it_has_a_model_and_stays_one(host):
    (host / "cfg" / "green.model.env").write_text("SOVEREIGN_RUNTIME_MODEL_URI=models:/churn/1\n")
    got = run_metrics(host)
    assert got["changed"] is True
    assert runtimes(got["metrics"]) == {
        "sovereign_runtime_green": {**endpoint("green"), "scheme": "http", "auth": False, "published_by": "runtime"}
    }
    # Nothing new: nothing changes (the deploy's play on the monitoring hosts keys on this).
    assert run_metrics(host) == {**got, "changed": False}
    # The second deploy gives blue a model: both are targets; green stays one (a rollback restarts nothing).
    (host / "cfg" / "blue.model.env").write_text("SOVEREIGN_RUNTIME_MODEL_URI=models:/churn/2\n")
    got = run_metrics(host)
    assert got["changed"] is True
    assert sorted(runtimes(got["metrics"])) == ["sovereign_runtime_blue", "sovereign_runtime_green"]
    assert got["metrics"]["sovereign_runtime_blue"]["port"] == COLORS["blue"]


def test_a_contract_without_color_metrics_is_left_as_it_is(host):
    """A host whose runtime section predates color_metrics (a deploy before the role's next converge): the
    endpoints it has stay, rather than being withdrawn."""
    before = json.loads((host / "sovereign.fact").read_text())["metrics"]
    got = run_metrics(host, color_metrics=False)
    assert got == {"changed": False, "metrics": before}
