"""sovereign.mlops._common's venv entry point (uv, offline), run for real by ansible-playbook on this machine.

Real uv, real venvs, real wheels: uv and two small dependency-free wheels are taken from the runtime's wheelhouse
set (`make bootstrap` builds .cache/wheelhouse/runtime) into a wheelhouse of their own in tmp_path; uv's own venv,
its cache and the target venv live in tmp_path too, so nothing outside it changes. One run installs (changed),
installs again (nothing to do: not changed) and asks for a package the wheelhouse lacks (fails, naming it); one run
in check mode asks for one more package (changed, and nothing installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
WHEELHOUSE = ROOT / ".cache" / "wheelhouse" / "runtime"
# Small wheels without dependencies, and uv's own.
WANTED = ("uv-", "idna-", "colorama-")


def _wheels(dest: Path) -> Path:
    found = {p: next(iter(sorted(WHEELHOUSE.glob(f"{p}*.whl"))), None) for p in WANTED}
    missing = [p.rstrip("-") for p, w in found.items() if w is None]
    if missing:
        pytest.fail(f"{WHEELHOUSE} lacks {missing}: run `make bootstrap` (requirements/hosts-runtime.in)")
    dest.mkdir()
    for wheel in found.values():
        shutil.copy(wheel, dest)
    return dest


def _run(tmp_path: Path, extra: dict, check: bool) -> tuple[int, str, dict]:
    tasks_dir = tmp_path / "roles" / "probe" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    install = {
        "ansible.builtin.include_role": {"name": "sovereign.mlops._common", "tasks_from": "venv"},
        "vars": {
            "_common_venv_path": "{{ venv }}",
            "_common_venv_packages": "{{ packages }}",
            "_common_venv_find_links": ["{{ wheels }}"],
            "_common_venv_uv_home": "{{ uv_home }}",
            "_common_venv_cache_dir": "{{ cache }}",
        },
    }
    record = {"ansible.builtin.set_fact": {"results": "{{ results | default([]) + [__common_venv.changed] }}"}}
    block = [
        {"name": "Install", **install},
        {"name": "Record", **record},
        {"name": "Install again", **install},
        {"name": "Record again", **record},
    ]
    if not check:
        lacking = {"name": "Install it", **install, "vars": {**install["vars"], "_common_venv_packages": ["nosuchpkg"]}}
        failure = {"failure": "{{ ansible_failed_result.stderr | default('') }}"}
        block.append({"name": "A package the wheelhouse lacks", "block": [lacking],
                      "rescue": [{"ansible.builtin.set_fact": failure}]})  # fmt: skip
    report = "{{ {'results': results, 'failure': failure | default('')} | to_json }}"
    block.append({"ansible.builtin.copy": {"content": report, "dest": "{{ out }}"}, "check_mode": False})
    (tasks_dir / "main.yml").write_text(yaml.safe_dump(block))
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False, "roles": ["probe"]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    out = tmp_path / ("out-check.json" if check else "out.json")
    extra = {**extra, "out": str(out), "ansible_python_interpreter": sys.executable}
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(tmp_path / "roles"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    argv = [str(PLAYBOOK_BIN), "-i", "localhost,", "-e", f"@{tmp_path / 'vars.json'}", str(tmp_path / "play.yml")]
    proc = subprocess.run(argv + (["--check"] if check else []), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    result = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, result


def _installed(venv: Path) -> set[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return {p["name"].lower() for p in json.loads(out)}


def test_install_then_nothing_to_do_then_a_missing_wheel_is_named_and_check_mode_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    extra = {"venv": str(venv), "wheels": str(_wheels(tmp_path / "wheels")), "uv_home": str(tmp_path / "uv"),
             "cache": str(tmp_path / "uv-cache")}  # fmt: skip

    rc, log, result = _run(tmp_path, {**extra, "packages": ["idna"]}, check=False)
    assert rc == 0, log
    assert result["results"] == [True, False], log  # installed, then nothing to do
    assert "idna" in _installed(venv)
    assert "nosuchpkg" in result["failure"], result["failure"]  # uv's message names what it could not find

    rc, log, result = _run(tmp_path, {**extra, "packages": ["idna", "colorama"]}, check=True)
    assert rc == 0, log
    assert result["results"] == [True, True], log  # would install colorama, each time
    assert "colorama" not in _installed(venv)
