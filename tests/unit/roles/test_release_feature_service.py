"""The release role's feature-service preflight, run for real by ansible-playbook on the controller (connection
local): the tasks of roles/release/tasks/preflight.yml that ask the host's Feast registry, against a real Feast
repository (file registry, applied with the SDK) and the real `sovereign-runtime features` console script of
this venv standing in for the target color's venv. A service the registry lacks is refused, naming those it has;
no repository in the host contract is refused; the right one passes. Nothing is restarted by these tasks: they
run in deploy_prepare, before the lock and any change.
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
PREFLIGHT = ROOT / "roles" / "release" / "tasks" / "preflight.yml"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="module")
def feast_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("feast")
    if not (VENV / "bin" / "sovereign-runtime").exists():
        pytest.skip("the runtime is not installed in this venv (pip install -e runtime)")
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Float32

    repo = tmp_path_factory.mktemp("feast")
    (repo / "feature_store.yaml").write_text(
        f"project: churn\nprovider: local\nregistry: {repo}/registry.db\n"
        f"online_store:\n  type: sqlite\n  path: {repo}/online.db\nentity_key_serialization_version: 3\n"
    )
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(name="customers", path=str(repo / "customers.parquet"), timestamp_field="event_timestamp")
    view = FeatureView(name="v", entities=[customer], schema=[Field(name="a", dtype=Float32)], source=source)
    FeatureStore(repo_path=str(repo)).apply([customer, source, view, FeatureService(name="churn", features=[view])])
    return repo


def run_preflight(tmp_path: Path, service: str, feast_repo: str) -> subprocess.CompletedProcess:
    tasks = [t for t in yaml.safe_load(PREFLIGHT.read_text()) if "deploy_feature_service" in json.dumps(t)]
    assert len(tasks) == 3, [t["name"] for t in tasks]
    play = [{"hosts": "all", "connection": "local", "gather_facts": False, "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    contract = {"runtime": {"feast_repo": feast_repo, "colors": {"green": {"venv": str(VENV)}}}}
    extra = {
        "ansible_python_interpreter": sys.executable,
        "color": "green",
        "deploy_feature_service": service,
        "_release_runtime": contract["runtime"],
        "_release_color_contract": contract["runtime"]["colors"],
        "_release_install_dir": "/nonexistent",
    }
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}  # fmt: skip
    cmd = [str(PLAYBOOK_BIN), "-i", "infer-01,", "-e", f"@{tmp_path / 'vars.json'}", str(tmp_path / "play.yml")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_feature_service_the_registry_lacks_is_refused_naming_what_it_has(feast_repo, tmp_path):
    proc = run_preflight(tmp_path, "fraud", str(feast_repo))
    assert proc.returncode != 0
    out = proc.stdout
    assert "feature service 'fraud' is not in the Feast registry of project 'churn'" in out, out[-3000:]
    assert "it has 'churn'" in out and "Nothing was changed." in out


def test_the_registry_holding_it_passes(feast_repo, tmp_path):
    proc = run_preflight(tmp_path, "churn", str(feast_repo))
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_a_host_without_a_feast_repository_is_refused(tmp_path):
    proc = run_preflight(tmp_path, "churn", "")
    assert proc.returncode != 0
    assert "runtimes have no Feast" in proc.stdout and "repository" in proc.stdout, proc.stdout[-3000:]
