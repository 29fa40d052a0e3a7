"""inference_runtime's Feast wiring, rendered for real by ansible-playbook on the controller (connection local):
the runtimes' feature_store.yaml (SQL registry URL with the vaulted password put in, Redis with its password), the
pip requirement with the [feast] extra, the defaults taken from the feature-store host's `feast` contract section,
and the preflight that refuses an incomplete online store. The Feast SDK reads the rendered file back. What a host
does with it (install, restart) runs in the molecule scenarios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "inference_runtime"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"


def render(tmp_path: Path, extra: dict, feast_contract: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """The role's defaults and vars, its preflight's Feast asserts, its template: one local play."""
    preflight = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text())
    asserts = [t for t in preflight if "Feast" in t["name"] or "feature service" in t["name"]]
    out = tmp_path / "feature_store.yaml"
    facts = tmp_path / "facts.json"
    play = [
        {
            "hosts": "all",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "tasks": [
                *asserts,
                {
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "feature_store.yaml.j2"),
                        "dest": str(out),
                        "mode": "0600",
                    },
                    "when": "_inference_runtime_feast | bool",
                },
                {
                    "ansible.builtin.copy": {
                        "dest": str(facts),
                        "mode": "0600",
                        "content": "{{ {'requirement':"
                        " _inference_runtime_requirement, 'feast': _inference_runtime_feast | bool} | to_json }}",
                    }
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    inventory = {"all": {"hosts": {"infer-01": {}}}, "feast": {"hosts": {"ops-01": {}}}}
    if feast_contract is not None:
        inventory["feast"]["hosts"]["ops-01"] = {"ansible_local": {"sovereign": {"feast": feast_contract}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "vars.json").write_text(json.dumps({"ansible_python_interpreter": sys.executable, **extra}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}  # fmt: skip
    cmd = [
        str(PLAYBOOK_BIN),
        "-i",
        str(tmp_path / "inventory.yml"),
        "-l",
        "infer-01",
        "-e",
        f"@{tmp_path / 'vars.json'}",
    ]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "play.yml")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    result = json.loads(facts.read_text()) if facts.exists() else {}
    if out.exists():
        result["feature_store"] = yaml.safe_load(out.read_text())
    return proc, result


def test_contract_defaults_and_vault_passwords_make_a_repository_feast_reads(tmp_path):
    contract = {
        "project": "churn",
        "registry": "postgresql+psycopg://feast@10.0.0.5:5432/feast",
        "redis": "10.0.0.5:6379",
    }
    proc, result = render(
        tmp_path,
        {"inference_runtime_feast_registry_password": "p@ss/w:rd", "inference_runtime_feast_redis_password": 's3"c'},
        contract,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["feast"] is True and result["requirement"] == "sovereign-runtime[mlflow,feast]"
    doc = result["feature_store"]
    assert doc["project"] == "churn"
    assert doc["registry"]["registry_type"] == "sql"
    assert doc["registry"]["path"] == "postgresql+psycopg://feast:p%40ss%2Fw%3Ard@10.0.0.5:5432/feast"
    assert doc["online_store"] == {"type": "redis", "connection_string": '10.0.0.5:6379,password=s3"c'}
    assert "p@ss" not in proc.stdout and 's3"c' not in proc.stdout  # no_log on the asserts that see them
    # The SDK takes the file as it is (no connection is made to load the config)
    from feast.repo_config import load_repo_config

    config = load_repo_config(tmp_path, tmp_path / "feature_store.yaml")
    assert config.project == "churn" and config.online_store.type == "redis"


def test_without_an_online_store_nothing_changes(tmp_path):
    proc, result = render(tmp_path, {})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result == {"feast": False, "requirement": "sovereign-runtime[mlflow]"}


def test_an_incomplete_online_store_is_refused(tmp_path):
    incomplete = {"inference_runtime_feast_redis": "10.0.0.5:6379", "inference_runtime_feast_project": "x"}
    proc, _result = render(tmp_path, {**incomplete, "inference_runtime_feast_registry": "/var/lib/feast/registry.db"})
    assert proc.returncode != 0
    assert "inference_runtime_feast_redis_password (from ansible-vault" in proc.stdout, proc.stdout[-3000:]
    proc, _result = render(tmp_path, {"inference_runtime_feature_service": "churn"})
    assert proc.returncode != 0 and "no Feast online store is" in proc.stdout, proc.stdout[-3000:]
