"""sovereign.mlops.grafana's preflight, run for real by ansible-playbook on the controller (connection local, check
mode, tags grafana_install so only preflight and the skipped install run): a play that would leave Grafana with
admin/admin, no password or a short one fails naming the fix, and so do a wildcard bind and an unpinned version.
Nothing reaches the configure step, so nothing on this machine is touched. The converge itself: molecule/monitoring
(the grafana role on its monitoring host, tests/test_grafana.py there).
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
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
GOOD = "a-long-vault-password"


def _run(tmp_path: Path, extra_vars: dict, after: list | None = None) -> subprocess.CompletedProcess:
    play = [
        {
            "name": "Probe",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Grafana",
                    "ansible.builtin.include_role": {"name": "sovereign.mlops.grafana", "public": True},
                    "tags": ["grafana_install"],
                },
                *(after or []),
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.json").write_text(json.dumps({"grafana_install": False, **extra_vars}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["ANSIBLE_LOCAL_TEMP"] = str(tmp_path / "ansible-tmp")
    args = ["-i", "localhost,", "--check", "--tags", "grafana_install", "-e", f"@{tmp_path / 'vars.json'}"]
    return subprocess.run(
        [str(PLAYBOOK_BIN), *args, str(tmp_path / "play.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, "missing required arguments: grafana_admin_password"),
        ({"grafana_admin_password": "admin"}, "admin/admin"),
        ({"grafana_admin_password": "short"}, "shorter than 12 characters"),
        ({"grafana_admin_password": "admin", "grafana_admin_user": "admin"}, "vault_grafana_admin_password"),
        ({"grafana_admin_password": GOOD, "grafana_listen_address": "0.0.0.0"}, "not a\nwildcard"),
        ({"grafana_admin_password": GOOD, "grafana_version": "latest"}, "must be a pinned version"),
    ],
    ids=["missing", "admin", "short", "names-vault", "wildcard-bind", "unpinned"],
)
def test_bad_settings_fail_before_anything_changes(tmp_path, extra, fragment):
    result = _run(tmp_path, {"grafana_listen_address": "10.0.0.5", **extra})
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert fragment.replace("\n", " ") in " ".join(out.split()), out
    if extra:  # a missing password: the role's argument specs refuse it, before preflight
        assert "Nothing was changed" in out
    assert GOOD not in out


def test_good_settings_pass_preflight(tmp_path):
    result = _run(tmp_path, {"grafana_admin_password": GOOD, "grafana_listen_address": "10.0.0.5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert GOOD not in result.stdout


def test_datasource_urls_without_a_monitoring_group_name_the_host_itself(tmp_path):
    """No monitoring group and no contract: the derived URLs are http://<inventory name>:<port> (molecule/monitoring
    checks the other two ways: an explicit grafana_prometheus_url, and the monitoring host's contract)."""
    show = {
        "name": "Show the derived URLs",
        "ansible.builtin.debug": {
            "msg": "URLS {{ _grafana_prometheus_url | trim }} {{ _grafana_alertmanager_url | trim }}"
        },
        "tags": ["grafana_install"],
    }
    result = _run(tmp_path, {"grafana_admin_password": GOOD, "grafana_listen_address": "10.0.0.5"}, after=[show])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "URLS http://localhost:9090 http://localhost:9093" in result.stdout, result.stdout
