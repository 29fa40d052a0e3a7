"""sovereign.mlops._common's wheelhouse preflight, run for real by ansible-playbook on the controller.

Controller-side only (connection local, check mode, a wheelhouse of empty files in tmp_path): the
messages a missing wheelhouse or wheel gives, how requirements match wheel file names, and that the
internal role refuses to run outside a role. The copy itself runs in the molecule scenarios.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"


def _playbook(tmp_path: Path, tasks: list[dict], extra_vars: dict | None = None) -> subprocess.CompletedProcess:
    play = [{"name": "Probe", "hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": tasks}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.json").write_text(json.dumps(extra_vars or {}))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(tmp_path / "roles"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        [
            str(PLAYBOOK_BIN),
            "-i",
            "localhost,",
            "--check",
            "-e",
            f"@{tmp_path / 'vars.json'}",
            str(tmp_path / "play.yml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _probe_role(tmp_path: Path) -> None:
    """A stand-in caller role: _common is internal and runs only when a role includes it."""
    tasks = tmp_path / "roles" / "probe" / "tasks"
    tasks.mkdir(parents=True)
    check = {
        "name": "Check",
        "ansible.builtin.include_role": {"name": "sovereign.mlops._common", "tasks_from": "wheelhouse_check"},
        "vars": {
            "_common_wheelhouse_name": "demo",
            "_common_wheelhouse_src": "{{ probe_src }}",
            "_common_wheelhouse_extra_src": "{{ probe_extra | default([]) }}",
            "_common_wheelhouse_requires": "{{ probe_requires }}",
            "_common_wheelhouse_unique": "{{ probe_unique | default(false) }}",
        },
    }
    # base64: one token, whatever the stdout callback's quoting and line folding.
    show = {
        "name": "Show",
        "ansible.builtin.debug": {"msg": "WHEELS={{ __common_wheelhouse_wheels | to_json | b64encode }}"},
    }
    (tasks / "main.yml").write_text(yaml.safe_dump([check, show]))


def _wheels(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def _include(role: str, **kwargs: str) -> dict:
    return {"name": f"Include {role}", "ansible.builtin.include_role": {"name": role, **kwargs}}


def _flat(text: str) -> str:
    """The output with YAML line folding undone, for substring checks of long messages."""
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("role", "first_install_task"),
    [
        ("sovereign.mlops.inference_runtime", "Install the runtime's system packages"),
        ("sovereign.mlops.dvc_client", "Install the system packages"),
    ],
)
def test_an_unset_wheelhouse_fails_preflight_naming_the_variable(
    tmp_path: Path, role: str, first_install_task: str
) -> None:
    result = _playbook(tmp_path, [_include(role)])
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert "sovereign_wheelhouse_dir is not set" in out
    assert "make bootstrap" in out
    assert first_install_task not in out, "the preflight failed after the host was touched"


def test_a_missing_pinned_wheel_is_named(tmp_path: Path) -> None:
    _wheels(tmp_path / "wh" / "dvc", "dvc-3.67.0-py3-none-any.whl", "dvc_ssh-4.3.0-py3-none-any.whl")
    result = _playbook(
        tmp_path, [_include("sovereign.mlops.dvc_client")], {"sovereign_wheelhouse_dir": str(tmp_path / "wh")}
    )
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert "No wheel for 'dvc==3.67.1'" in out
    assert "requirements/hosts-dvc.in" in out
    assert "'dvc-ssh==4.3.0'" not in out


def test_a_wheelhouse_dir_that_is_set_but_absent_says_so(tmp_path: Path) -> None:
    result = _playbook(
        tmp_path,
        [_include("sovereign.mlops.inference_runtime")],
        {"sovereign_wheelhouse_dir": str(tmp_path / "nowhere")},
    )
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert f"{tmp_path}/nowhere/runtime is not a directory" in out
    assert f"sovereign_wheelhouse_dir (now {tmp_path}/nowhere)" in out
    assert "inference_runtime_wheelhouse_local_dir" in out


def test_requirements_match_wheels_by_normalised_name_and_pinned_version(tmp_path: Path) -> None:
    _probe_role(tmp_path)
    src = _wheels(
        tmp_path / "set",
        "foo_bar-1.0-py3-none-any.whl",
        "foo_bar-1.1-py3-none-any.whl",
        "Flask_WTF-1.3.0-py3-none-any.whl",
        "foo_barbaz-1.0-py3-none-any.whl",
    )
    extra = _wheels(tmp_path / "extra", "qux-2.0+local-py3-none-any.whl")
    result = _playbook(
        tmp_path,
        [_include("probe")],
        {
            "probe_src": str(src),
            "probe_extra": [str(extra)],
            "probe_requires": ["foo-bar==1.0", "Foo.Bar[x]>=1", "flask-wtf", "qux==2.0+local"],
        },
    )
    assert result.returncode == 0, result.stdout
    found = json.loads(base64.b64decode(re.search(r"WHEELS=([A-Za-z0-9+/=]+)", result.stdout).group(1)))
    assert found == {
        "foo-bar==1.0": [f"{src}/foo_bar-1.0-py3-none-any.whl"],
        "Foo.Bar[x]>=1": [f"{src}/foo_bar-1.0-py3-none-any.whl", f"{src}/foo_bar-1.1-py3-none-any.whl"],
        "flask-wtf": [f"{src}/Flask_WTF-1.3.0-py3-none-any.whl"],
        "qux==2.0+local": [f"{extra}/qux-2.0+local-py3-none-any.whl"],
    }


def test_unique_refuses_two_wheels_of_one_requirement(tmp_path: Path) -> None:
    _probe_role(tmp_path)
    src = _wheels(
        tmp_path / "set", "sovereign_runtime-0.1.0-py3-none-any.whl", "sovereign_runtime-0.2.0-py3-none-any.whl"
    )
    result = _playbook(
        tmp_path,
        [_include("probe")],
        {"probe_src": str(src), "probe_requires": ["sovereign-runtime"], "probe_unique": True},
    )
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert "Expected one wheel for 'sovereign-runtime'" in out
    assert "sovereign_runtime-0.2.0-py3-none-any.whl" in out


def test_a_wheel_in_two_directories_is_refused(tmp_path: Path) -> None:
    _probe_role(tmp_path)
    src = _wheels(tmp_path / "set", "a-1-py3-none-any.whl")
    extra = _wheels(tmp_path / "extra", "a-1-py3-none-any.whl")
    result = _playbook(
        tmp_path, [_include("probe")], {"probe_src": str(src), "probe_extra": [str(extra)], "probe_requires": ["a"]}
    )
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert "These wheels are in more than one of" in out
    assert "a-1-py3-none-any.whl" in out


def test_the_internal_role_refuses_a_direct_call(tmp_path: Path) -> None:
    task = {
        "name": "Call _common from a play",
        "ansible.builtin.include_role": {"name": "sovereign.mlops._common", "tasks_from": "apt"},
        "vars": {"_common_apt_packages": ["hello"]},
    }
    result = _playbook(tmp_path, [task])
    out = _flat(result.stdout)
    assert result.returncode != 0, out
    assert "sovereign.mlops._common is internal to the collection" in out
