# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""deploy_lock on a real directory in tmp_path (no mocks): a table of lock states x operations."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _fleet_lock, _ledger
from ansible_collections.sovereign.mlops.plugins.modules import deploy_lock
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

NOW_ISO = _ledger.iso_from_epoch(time.time())
FRESH_TTL = 86400
OLD_ISO = "2020-01-01T00:00:00Z"


def _make_lock(path, holder, since, ttl, token="theirs", info=True, **extra):
    os.mkdir(path)
    if info:
        (path / "info.json").write_text(json.dumps(dict(holder=holder, since=since, ttl=ttl, token=token, **extra)))


# A fresh lock of a run on controller ctl, its ansible-playbook pid 4100 ("killed": existing="killed").
KILLED = dict(controller="ctl", controller_pid=4100, controller_pid_started="Sat Nov 21 06:00:00 2026")
DEAD = dict(controller="ctl", controller_pid=4100, since=NOW_ISO)


# existing: None (no lock), "fresh" (held, within TTL), "stale" (held, past TTL), "noinfo" (dir without info.json,
# mtime now), "ours" (fresh, token "mine").
CASES = [
    dict(id="take-free", existing=None, args=dict(holder="alice@ctl"), failed=False, changed=True, held_by="alice@ctl"),
    dict(
        id="refused-when-held",
        existing="fresh",
        args=dict(holder="alice@ctl"),
        failed=True,
        msg=f"is held by bob@ci since {NOW_ISO}",
        held_by="bob@ci",
    ),
    dict(
        id="break-stale",
        existing="stale",
        args=dict(holder="alice@ctl"),
        failed=False,
        changed=True,
        warning="breaking a stale fleet deploy lock",
        held_by="alice@ctl",
        broken="bob@ci",
    ),
    dict(
        id="dir-without-info-is-held-until-its-ttl",
        existing="noinfo",
        args=dict(holder="alice@ctl"),
        failed=True,
        msg="unknown (lock without info.json)",
        held_by=None,
    ),
    dict(
        id="renew-own",
        existing="ours",
        args=dict(holder="alice@ctl", token="mine"),
        failed=False,
        changed=False,
        held_by="bob@ci",
    ),
    dict(
        id="release-own",
        existing="ours",
        args=dict(state="absent", token="mine"),
        failed=False,
        changed=True,
        held_by=None,
    ),
    dict(
        id="release-not-ours-leaves-it",
        existing="fresh",
        args=dict(state="absent", token="mine"),
        failed=False,
        changed=False,
        warning="left the fleet deploy lock",
        held_by="bob@ci",
    ),
    dict(
        id="release-force",
        existing="fresh",
        args=dict(state="absent", force=True),
        failed=False,
        changed=True,
        held_by=None,
    ),
    dict(id="release-absent", existing=None, args=dict(state="absent", token="x"), failed=False, changed=False),
    dict(id="check-take", existing=None, args=dict(holder="a@b"), check=True, failed=False, changed=True),
    dict(
        id="check-refused",
        existing="fresh",
        args=dict(holder="a@b"),
        check=True,
        failed=True,
        msg="is held by bob@ci",
        held_by="bob@ci",
    ),
    dict(
        id="check-break",
        existing="stale",
        args=dict(holder="a@b"),
        check=True,
        failed=False,
        changed=True,
        held_by="bob@ci",
    ),
    dict(
        id="check-release",
        existing="ours",
        args=dict(state="absent", token="mine"),
        check=True,
        failed=False,
        changed=True,
        held_by="bob@ci",
    ),
    # Liveness (docs/adr/0502): the caller found the holder's ansible-playbook dead on its controller.
    dict(
        id="break-dead-holder",
        existing="killed",
        args=dict(holder="alice@ctl", controller="ctl", controller_pid=4200, dead_holder=DEAD),
        failed=False,
        changed=True,
        warning="held by bob@ci since",
        warning2="(ansible-playbook pid 4100 on ctl): that ansible-playbook is no longer running",
        held_by="alice@ctl",
        broken="bob@ci",
        because="dead",
        recorded=dict(controller="ctl", controller_pid=4200),
    ),
    dict(
        id="dead-holder-other-pid-refuses",
        existing="killed",
        args=dict(holder="alice@ctl", dead_holder=dict(DEAD, controller_pid=4101)),
        failed=True,
        msg="is held by bob@ci since",
        msg2="(ansible-playbook pid 4100 on ctl)",
        held_by="bob@ci",
    ),
    dict(
        id="dead-holder-other-controller-refuses",
        existing="killed",
        args=dict(holder="alice@ctl", dead_holder=dict(DEAD, controller="elsewhere")),
        failed=True,
        msg="add -e deploy_break_lock=true",
        held_by="bob@ci",
    ),
    dict(
        id="dead-holder-retaken-since-refuses",
        existing="killed",
        args=dict(holder="alice@ctl", dead_holder=dict(DEAD, since=OLD_ISO)),
        failed=True,
        msg="is held by bob@ci",
        held_by="bob@ci",
    ),
    dict(
        id="dead-holder-needs-a-pid",
        existing="fresh",
        args=dict(holder="alice@ctl", dead_holder=dict(controller="", controller_pid=None, since=NOW_ISO)),
        failed=True,
        msg="is held by bob@ci",
        held_by="bob@ci",
    ),
    dict(
        id="force-breaks-a-live-lock",
        existing="fresh",
        args=dict(holder="alice@ctl", force=True),
        failed=False,
        changed=True,
        warning="breaking the fleet deploy lock",
        warning2="as asked (force / deploy_break_lock)",
        held_by="alice@ctl",
        broken="bob@ci",
        because="force",
    ),
    dict(
        id="check-break-dead",
        existing="killed",
        args=dict(holder="alice@ctl", dead_holder=DEAD),
        check=True,
        failed=False,
        changed=True,
        held_by="bob@ci",
        because="dead",
    ),
    dict(
        id="release-not-ours-names-the-process",
        existing="killed",
        args=dict(state="absent", token="mine"),
        failed=False,
        changed=False,
        warning="(ansible-playbook pid 4100 on ctl)",
        held_by="bob@ci",
    ),
    dict(
        id="take-records-the-controller",
        existing=None,
        args=dict(holder="alice@ctl", controller="ctl", controller_pid=4200, controller_pid_started="Sat"),
        failed=False,
        changed=True,
        held_by="alice@ctl",
        recorded=dict(controller="ctl", controller_pid=4200, controller_pid_started="Sat"),
    ),
    dict(id="bad-ttl", existing=None, args=dict(holder="a@b", ttl=0), failed=True, msg="ttl must be a positive"),
    dict(id="holder-required", existing=None, args=dict(), failed=True, msg="holder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_deploy_lock(tmp_path, capsys, case):
    path = tmp_path / "deploy.lock"
    existing = case["existing"]
    # NOW_ISO is taken at import: a "fresh" lock needs a TTL that outlasts a slow unit run (600 s did not, at load 15).
    if existing == "fresh":
        _make_lock(path, "bob@ci", NOW_ISO, FRESH_TTL)
    elif existing == "stale":
        _make_lock(path, "bob@ci", OLD_ISO, 60)
    elif existing == "noinfo":
        _make_lock(path, None, None, None, info=False)
    elif existing == "killed":
        _make_lock(path, "bob@ci", NOW_ISO, FRESH_TTL, **KILLED)
    elif existing == "ours":
        _make_lock(path, "bob@ci", NOW_ISO, FRESH_TTL, token="mine")
    result = run_module(deploy_lock.main, dict(path=str(path), **case["args"]), capsys, check_mode=case.get("check"))

    assert bool(result.get("failed")) is case["failed"], result
    for key in ("msg", "msg2"):
        if key in case:
            assert case[key] in result["msg"]
    if "changed" in case:
        assert result["changed"] is case["changed"]
    for key in ("warning", "warning2"):
        if key in case:
            # ansible-core >= 2.19 returns warnings as structured events: search their JSON.
            assert case[key] in json.dumps(result.get("warnings", [])), result
    if "because" in case:
        assert result["broken_because"] == case["because"]
    if "recorded" in case:
        info = _fleet_lock.read_lock(str(path))
        assert {k: info.get(k) for k in case["recorded"]} == case["recorded"]
        assert result["token"] == info["token"]
    if "broken" in case:
        assert result["broken"]["holder"] == case["broken"]
        assert "token" not in result["broken"]
    if "held_by" in case:
        info = _fleet_lock.read_lock(str(path))
        if case["held_by"] is None and existing != "noinfo":
            assert info is None
        elif case["held_by"] is not None:
            assert info["holder"] == case["held_by"]
    if case["id"] == "take-free":
        info = _fleet_lock.read_lock(str(path))
        assert result["token"] == info["token"]
        assert info["ttl"] == 3600
        assert abs(_ledger.epoch_from_iso(info["since"]) - time.time()) < 5


def _take(path, queue):
    info = _fleet_lock.try_mkdir_lock(path, f"pid-{os.getpid()}", 60)
    queue.put(info is not None)


def test_only_one_of_many_concurrent_takers_wins(tmp_path):
    path = str(tmp_path / "deploy.lock")
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_take, args=(path, queue)) for _index in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert sorted(queue.get() for _proc in procs) == [False] * 7 + [True]


@pytest.mark.parametrize(
    ("since", "ttl", "now", "stale"),
    [
        ("2026-01-01T00:00:00Z", 60, _ledger.epoch_from_iso("2026-01-01T00:00:59Z"), False),
        ("2026-01-01T00:00:00Z", 60, _ledger.epoch_from_iso("2026-01-01T00:01:01Z"), True),
        ("2026-01-01T00:00:00Z", "bad", _ledger.epoch_from_iso("2026-01-01T00:00:01Z"), True),
        ("not a time", 60, 0, True),
    ],
)
def test_staleness(since, ttl, now, stale):
    assert _fleet_lock.is_stale(dict(since=since, ttl=ttl), now=now) is stale
