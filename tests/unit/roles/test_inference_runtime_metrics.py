"""The inference_runtime role's entry point `metrics` (roles/inference_runtime/tasks/metrics.yml), run for real by
ansible-playbook on the controller (connection local) against a host contract in a temporary file: a color is a
scrape target once it has a model on the host, and from then on (docs/adr/1531-scrape-a-color-once-it-has-a-model.md).
The same tasks run at the end of the role and in a deploy, after it writes the color's model (roles/release).

One ansible-playbook run serves every test (each ansible-playbook start costs ~5 s of CPU): one play per host, each
host its own directory (runtime config dir, contract file) and its own sequence of runs of the entry point; after
each run the play records whether it changed and a copy of the contract, which the tests read.
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


# Each host's contract before the first run: both colors still published (what the role published before this
# rule) plus another section's endpoint.
PUBLISHED = {f"sovereign_runtime_{c}": {**endpoint(c), "published_by": "runtime"} for c in COLORS}
PUBLISHED["node_exporter"] = {"job": "node_exporter", "address": "10.0.0.5", "port": 9100, "published_by": "common"}


def _run_entry(host: Path, n: int) -> list[dict]:
    """Tasks: run the entry point, then record run n (changed, and the contract as it is now)."""
    contract = f"lookup('ansible.builtin.file', '{host / 'sovereign.fact'}') | from_json"
    record = "{'changed': __inference_runtime_metrics is changed, 'contract': " + contract + "}"
    return [
        {"name": f"Run {n}", "ansible.builtin.include_role": ENTRY},
        {
            "name": f"Record run {n}",
            "ansible.builtin.copy": {
                "content": "{{ " + record + " | to_json }}",
                "dest": str(host / f"run{n}.json"),
                "mode": "0600",
            },
        },
    ]


def _write_model(host: Path, color: str, uri: str) -> dict:
    """A deploy giving the color a model: its model.env, as the release role writes it."""
    return {
        "name": f"Give {color} a model",
        "ansible.builtin.copy": {
            "content": f"SOVEREIGN_RUNTIME_MODEL_URI={uri}\n",
            "dest": str(host / "cfg" / f"{color}.model.env"),
            "mode": "0644",
        },
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """{host: [{changed, metrics} after each run of the entry point]}, from one ansible-playbook run:
    fresh: no color deployed, one run; deployed: green gets a model (run 1), nothing new (run 2), blue gets one
    (run 3); legacy: a runtime section without color_metrics, one run."""
    base = tmp_path_factory.mktemp("metrics")
    hosts = {name: base / name for name in ("fresh", "deployed", "legacy")}
    for host in hosts.values():
        (host / "cfg").mkdir(parents=True)
        (host / "sovereign.fact").write_text(json.dumps({"version": 1, "metrics": PUBLISHED}))
    (hosts["deployed"] / "cfg" / "green.model.env").write_text("SOVEREIGN_RUNTIME_MODEL_URI=models:/churn/1\n")
    deployed = hosts["deployed"]
    sequences = {
        "fresh": _run_entry(hosts["fresh"], 1),
        "deployed": _run_entry(deployed, 1) + _run_entry(deployed, 2)
        + [_write_model(deployed, "blue", "models:/churn/2")] + _run_entry(deployed, 3),
        "legacy": _run_entry(hosts["legacy"], 1),
    }  # fmt: skip
    inventory = {"all": {"hosts": {}}}
    for name, host in hosts.items():
        runtime = {"colors": {c: {"model_env": str(host / "cfg" / f"{c}.model.env")} for c in COLORS}}
        if name != "legacy":
            runtime["color_metrics"] = {c: endpoint(c) for c in COLORS}
        inventory["all"]["hosts"][name] = {"ansible_python_interpreter": sys.executable, "_test_runtime": runtime}
    play = [
        {
            "name": f"Host {name}",
            "hosts": name,
            "connection": "local",
            "gather_facts": False,
            "module_defaults": {
                "sovereign.mlops.host_contract": {"path": str(host / "sovereign.fact")},
                "ansible.builtin.setup": {"fact_path": str(host / "no-facts.d")},
            },
            "tasks": sequences[name],
        }
        for name, host in hosts.items()
    ]
    (base / "play.yml").write_text(yaml.safe_dump(play))
    (base / "hosts.yml").write_text(yaml.safe_dump(inventory))
    # ansible_local as an extra var: the contract the caller has read (the release role's, or contract.yml's); each
    # host's own runtime section (an extra var outranks the facts the entry point re-reads, as in a real run where
    # the caller's facts are the contract on disk).
    extra = {"ansible_local": {"sovereign": {"runtime": "{{ _test_runtime }}"}}}
    (base / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(base / "tmp")}  # fmt: skip
    cmd = [str(PLAYBOOK_BIN), "-i", str(base / "hosts.yml"), "-e", f"@{base / 'vars.json'}", str(base / "play.yml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    runs = {}
    for name, host in hosts.items():
        recorded = [json.loads(p.read_text()) for p in sorted(host.glob("run*.json"))]
        runs[name] = [{"changed": r["changed"], "metrics": r["contract"]["metrics"]} for r in recorded]
    assert [len(runs[n]) for n in hosts] == [1, 3, 1], proc.stdout[-3000:]
    return runs


def runtimes(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("sovereign_runtime_")}


def test_a_color_without_a_model_is_no_target(runs):
    """A fresh host (no color deployed): neither color is published; the old rule's endpoints are withdrawn, the
    other sections' endpoints stay."""
    (got,) = runs["fresh"]
    assert got["changed"] is True
    assert runtimes(got["metrics"]) == {}
    assert got["metrics"]["node_exporter"]["published_by"] == "common"


def test_a_color_is_a_target_once_it_has_a_model_and_stays_one(runs):
    first, again, second_deploy = runs["deployed"]
    assert first["changed"] is True
    assert runtimes(first["metrics"]) == {
        "sovereign_runtime_green": {**endpoint("green"), "scheme": "http", "auth": False, "published_by": "runtime"}
    }
    # Nothing new: nothing changes (the deploy's play on the monitoring hosts keys on this).
    assert again == {**first, "changed": False}
    # The second deploy gives blue a model: both are targets; green stays one (a rollback restarts nothing).
    assert second_deploy["changed"] is True
    assert sorted(runtimes(second_deploy["metrics"])) == ["sovereign_runtime_blue", "sovereign_runtime_green"]
    assert second_deploy["metrics"]["sovereign_runtime_blue"]["port"] == COLORS["blue"]


def test_a_contract_without_color_metrics_is_left_as_it_is(runs):
    """A host whose runtime section predates color_metrics (a deploy before the role's next converge): the
    endpoints it has stay, rather than being withdrawn."""
    (got,) = runs["legacy"]
    assert got == {"changed": False, "metrics": PUBLISHED}
