"""The release role's smoke test over gRPC (roles/release/tasks/host.yml, "Smoke-test on its own port"): the task
itself, taken from host.yml, runs for real (ansible-playbook on localhost, the role's defaults and vars, the real
smoke_test module) against the harness's HTTP and grpcio servers of model ``double``, with the host contract's
color entry as roles/inference_runtime publishes it. The color's "venv" is a wrapper around this interpreter that
records that it ran: the module must run with the venv's python exactly when the gRPC smoke test runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    GOLDEN,
    GRPCOIPServer,
    OIPServer,
)

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "release"

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{defaults}, {vars}]
  tasks:
    - ansible.builtin.include_tasks: {task}
    - ansible.builtin.copy: {{content: "{{{{ __release_smoke | to_json }}}}", dest: "{{{{ out }}}}/smoke.json"}}
"""


def _smoke_task(name):
    tasks = yaml.safe_load((ROLE / "tasks" / name).read_text())
    (task,) = [t for t in tasks if str(t.get("name", "")).startswith("Smoke-test")]
    return task


def run_smoke(tmp_path, grpc_port, grpc_requests=None):
    http = OIPServer(mode="correct").start()
    grpc_server = GRPCOIPServer(mode="correct").start()
    try:
        venv = tmp_path / "venv"
        (venv / "bin").mkdir(parents=True)
        log = tmp_path / "venv-python.log"
        python = venv / "bin" / "python"
        python.write_text(f'#!/bin/sh\necho ran >> {log}\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        color = {"host": "127.0.0.1", "port": http.port, "venv": str(venv)}
        if grpc_port is not None:
            color["grpc_port"] = grpc_server.port if grpc_port == "server" else grpc_port
        (tmp_path / "task.yml").write_text(yaml.safe_dump([_smoke_task("host.yml")]))
        book = tmp_path / "smoke.yml"
        book.write_text(
            PLAYBOOK.format(
                defaults=ROLE / "defaults/main.yml", vars=ROLE / "vars/main.yml", task=tmp_path / "task.yml"
            )
        )
        extra = {
            "out": str(tmp_path),
            "color": "green",
            "ansible_local": {"sovereign": {"runtime": {"colors": {"green": color}}}},
            "_release_resolved": {"name": "double", "version": "7"},
            "_release_golden": GOLDEN,
            "deploy_smoke_requests": 3,
            "deploy_smoke_max_p99_ms": 5000,
        }
        if grpc_requests is not None:
            extra["deploy_smoke_grpc_requests"] = grpc_requests
        (tmp_path / "extra.json").write_text(json.dumps(extra))
        # The host's own python comes from the inventory (below the task's vars), not -e (above them).
        (tmp_path / "inventory").write_text(f"localhost ansible_python_interpreter={sys.executable}\n")
        env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "false"}
        out = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp_path / "inventory"), str(book),
             "-e", f"@{tmp_path / 'extra.json'}"],
            capture_output=True, text=True, env=env, timeout=180, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        grpc_server.stop()
        http.stop()
    result = json.loads((tmp_path / "smoke.json").read_text())
    return result, log.exists(), grpc_server


@pytest.mark.parametrize(
    ("grpc_port", "grpc_requests", "expected_calls"),
    [("server", None, 5), ("server", 2, 2), ("server", 0, 0), (0, None, 0), (None, None, 0)],
    ids=["grpc-port-default-requests", "grpc-port-2-requests", "requests-0-skips", "grpc-port-0", "no-grpc-port"],
)
def test_smoke_over_grpc_when_the_color_has_a_grpc_port(tmp_path, grpc_port, grpc_requests, expected_calls):
    result, venv_ran, server = run_smoke(tmp_path, grpc_port, grpc_requests)
    assert not result.get("failed"), result
    assert result["requests"] == 3
    assert len(server.requests) == expected_calls
    if expected_calls:
        assert result["grpc"]["target"] == f"127.0.0.1:{server.port}"
        assert result["grpc"]["requests"] == expected_calls
        assert [c["name"] for c in result["checks"]][-2:] == ["grpc_ready", "grpc_infer"]
    else:
        assert result["grpc"] is None
    assert venv_ran is bool(expected_calls), "the color's venv python runs the module exactly with the gRPC smoke test"


def test_rollback_smoke_task_is_wired_the_same_way():
    """rollback_host.yml's smoke test passes the same gRPC options and interpreter, for the target color."""
    deploy, rollback = _smoke_task("host.yml"), _smoke_task("rollback_host.yml")
    for key in ("grpc_target", "grpc_requests"):
        assert rollback["sovereign.mlops.smoke_test"][key] == deploy["sovereign.mlops.smoke_test"][key].replace(
            "[color]", "[_release_target]"
        )
    # One expression for both, in vars/main.yml (_release_smoke_python), indexed by the task's color.
    assert deploy["vars"] == {"ansible_python_interpreter": "{{ _release_smoke_python[color] }}"}
    assert rollback["vars"] == {"ansible_python_interpreter": "{{ _release_smoke_python[_release_target] }}"}


def test_urls_and_grpc_targets_bracket_an_ipv6_host(tmp_path):
    """Each color's URL and gRPC target as vars/main.yml renders them from the host contract: an IPv6 address in
    brackets (blue here), an IPv4 address or a name as it is (green); no gRPC port: no target."""
    book = tmp_path / "render.yml"
    book.write_text(
        f"""
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{ROLE / "defaults/main.yml"}, {ROLE / "vars/main.yml"}]
  tasks:
    - ansible.builtin.copy:
        content: "{{{{ {{'urls': _release_urls, 'grpc': _release_grpc_targets}} | to_json }}}}"
        dest: "{tmp_path}/out.json"
"""
    )
    colors = {
        "blue": {"host": "fd00::5", "port": 8001, "grpc_port": 9001},
        "green": {"host": "10.0.0.5", "port": 8002, "grpc_port": 0},
    }
    (tmp_path / "extra.json").write_text(json.dumps({"ansible_local": {"sovereign": {"runtime": {"colors": colors}}}}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(book),
         "-e", f"@{tmp_path / 'extra.json'}", "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rendered = json.loads((tmp_path / "out.json").read_text())
    assert rendered["urls"] == {"blue": "http://[fd00::5]:8001", "green": "http://10.0.0.5:8002"}
    assert {k: v.strip() for k, v in rendered["grpc"].items()} == {"blue": "[fd00::5]:9001", "green": ""}
