# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet lock's liveness decision (deploy_lock's action plugin, docs/adr/0502) against real processes.

holder_liveness() and controller_process() are imported from plugin_utils, not through the action plugin: importing
Ansible's controller (its display) in this process would change how the in-process module tests see warnings.

* holder_liveness(): a table of lock contents x real processes of this machine (this one, an exited one, one
  whose start time differs from the recorded one, another controller, no ps on PATH);
* controller_process(): a real forked process tree (a worker with its parent's command line) finds the parent;
* the action plugin in real ansible-playbook runs on localhost: the PID it records is ansible-playbook's, a dead
  holder of this controller is broken (also in check mode, where the lock stays), a live one or another
  controller's refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ansible_collections.sovereign.mlops.plugins.plugin_utils import _lock_liveness as liveness

ROOT = Path(__file__).resolve().parents[4]
ME = os.getpid()
HOST = socket.gethostname()


def _exited_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _started(pid):
    ps = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, check=True)
    return " ".join(ps.stdout.split())


# lock info -> verdict, seen from controller HOST
LIVENESS = [
    ("live", dict(controller=HOST, controller_pid=ME, controller_pid_started="MINE"), liveness.ALIVE),
    ("live-without-start-time", dict(controller=HOST, controller_pid=ME), liveness.ALIVE),
    (
        "pid-reused-by-another-process",
        dict(controller=HOST, controller_pid=ME, controller_pid_started="Thu Jan 1 2026"),
        liveness.DEAD,
    ),
    ("exited", dict(controller=HOST, controller_pid="EXITED", controller_pid_started="Thu Jan 1 2026"), liveness.DEAD),
    ("other-controller", dict(controller="elsewhere", controller_pid=ME), liveness.ELSEWHERE),
    ("no-controller-recorded", dict(holder="old@lock"), liveness.ELSEWHERE),
    ("pid-not-a-number", dict(controller=HOST, controller_pid="x"), liveness.UNKNOWN),
    ("pid-missing", dict(controller=HOST), liveness.UNKNOWN),
    ("pid-1", dict(controller=HOST, controller_pid=1), liveness.UNKNOWN),
]


@pytest.mark.parametrize(("info", "verdict"), [c[1:] for c in LIVENESS], ids=[c[0] for c in LIVENESS])
def test_holder_liveness(info, verdict):
    info = dict(info)
    if info.get("controller_pid_started") == "MINE":
        info["controller_pid_started"] = _started(ME)
    if info.get("controller_pid") == "EXITED":
        info["controller_pid"] = _exited_pid()
    assert liveness.holder_liveness(info, HOST) == verdict


def test_holder_liveness_without_ps_is_unknown(tmp_path, monkeypatch):
    """No procps on the controller: the holder cannot be checked, so it is not called dead."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert liveness.holder_liveness(dict(controller=HOST, controller_pid=ME), HOST) == liveness.UNKNOWN


def test_controller_process_is_the_forked_workers_parent(tmp_path):
    """A worker forked from the main process (as ansible-playbook forks its workers) finds the main process, not
    itself, and stops below a parent with another command line (here: this pytest)."""
    out = tmp_path / "found.json"
    script = (
        "import json, os, sys, time\n"
        f"sys.path[:0] = {sys.path!r}\n"
        "from ansible_collections.sovereign.mlops.plugins.plugin_utils import _lock_liveness as a\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    open({str(out)!r}, 'w').write(json.dumps(a.controller_process()))\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, "main-process-marker"])
    assert proc.wait(60) == 0
    pid, started = json.loads(out.read_text())
    assert pid == proc.pid
    assert started  # the ps lstart of the main process (it has exited since: not comparable here)


# -- the action plugin in real ansible-playbook runs ----------------------------------------------------------------

needs_playbook = pytest.mark.skipif(
    shutil.which("ansible-playbook", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]) is None,
    reason="ansible-playbook is not installed",
)


def _run(tmp_path, lock, check=False):
    """deploy_lock state=present on localhost in a real ansible-playbook; (proc, result of the task)."""
    out = tmp_path / "result.json"
    play = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Take the lock",
                    "sovereign.mlops.deploy_lock": {"path": str(lock), "holder": "alice@ctl", "ttl": 600},
                    "register": "taken",
                    "ignore_errors": True,
                },
                {
                    "ansible.builtin.copy": {"dest": str(out), "content": "{{ taken | to_json }}", "mode": "0644"},
                    "check_mode": False,
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    env.update(
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    cmd = ["ansible-playbook", "-i", "localhost,", str(tmp_path / "play.yml")] + (["--check"] if check else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(out.read_text())
    return proc, result, output


def _lock(path, **info):
    path.mkdir()
    base = dict(holder="bob@ctl", since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ttl=1800, token="theirs")
    (path / "info.json").write_text(json.dumps(dict(base, **info)))


PLAYS = [
    # id, lock info (None: no lock), check, failed, result fields, output fragments, lock holder after
    ("free-records-ansible-playbook", None, False, False, {}, [], "alice@ctl"),
    (
        "dead-holder-broken",
        dict(controller=HOST, controller_pid="EXITED"),
        False,
        False,
        dict(liveness="dead", broken_because="dead"),
        ["that ansible-playbook is no longer running"],
        "alice@ctl",
    ),
    (
        "dead-holder-check-mode-leaves-it",
        dict(controller=HOST, controller_pid="EXITED"),
        True,
        False,
        dict(liveness="dead", broken_because="dead", changed=True),
        [],
        "bob@ctl",
    ),
    (
        "live-holder-refuses",
        dict(controller=HOST, controller_pid=ME, controller_pid_started="MINE"),
        False,
        True,
        dict(liveness="alive"),
        [f"Its ansible-playbook (pid {ME}) is still running on this controller ({HOST})"],
        "bob@ctl",
    ),
    (
        "other-controller-refuses",
        dict(controller="elsewhere", controller_pid=ME),
        False,
        True,
        dict(liveness="elsewhere"),
        ["add -e deploy_break_lock=true"],
        "bob@ctl",
    ),
]


@needs_playbook
@pytest.mark.parametrize(
    ("info", "check", "failed", "want", "fragments", "after"), [p[1:] for p in PLAYS], ids=[p[0] for p in PLAYS]
)
def test_action_plugin_in_ansible_playbook(tmp_path, info, check, failed, want, fragments, after):
    lock = tmp_path / "deploy.lock"
    if info is not None:
        info = dict(info)
        if info.get("controller_pid") == "EXITED":
            info["controller_pid"] = _exited_pid()
        if info.get("controller_pid_started") == "MINE":
            info["controller_pid_started"] = _started(ME)
        _lock(lock, **info)
    proc, result, _output = _run(tmp_path, lock, check=check)
    assert bool(result.get("failed")) is failed, result
    for key, value in want.items():
        assert result[key] == value, (key, result)
    text = json.dumps(result)
    for fragment in fragments:
        assert fragment in text, text
    held = json.loads((lock / "info.json").read_text())
    assert held["holder"] == after
    if after == "alice@ctl":
        # The PID the lock names is the ansible-playbook that took it, not a worker or the module's process.
        assert (held["controller"], held["controller_pid"]) == (HOST, proc.pid), held
        assert held["controller_pid_started"]
