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
from ansible_collections.sovereign.mlops.plugins.module_utils import _ledger
from ansible_collections.sovereign.mlops.plugins.modules import deploy_lock
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

NOW_ISO = _ledger.iso_from_epoch(time.time())
OLD_ISO = "2020-01-01T00:00:00Z"


def _make_lock(path, holder, since, ttl, token="theirs", info=True):
    os.mkdir(path)
    if info:
        (path / "info.json").write_text(json.dumps(dict(holder=holder, since=since, ttl=ttl, token=token)))


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
    dict(id="bad-ttl", existing=None, args=dict(holder="a@b", ttl=0), failed=True, msg="ttl must be a positive"),
    dict(id="holder-required", existing=None, args=dict(), failed=True, msg="holder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_deploy_lock(tmp_path, capsys, case):
    path = tmp_path / "deploy.lock"
    existing = case["existing"]
    if existing == "fresh":
        _make_lock(path, "bob@ci", NOW_ISO, 600)
    elif existing == "stale":
        _make_lock(path, "bob@ci", OLD_ISO, 60)
    elif existing == "noinfo":
        _make_lock(path, None, None, None, info=False)
    elif existing == "ours":
        _make_lock(path, "bob@ci", NOW_ISO, 600, token="mine")
    result = run_module(deploy_lock.main, dict(path=str(path), **case["args"]), capsys, check_mode=case.get("check"))

    assert bool(result.get("failed")) is case["failed"], result
    if "msg" in case:
        assert case["msg"] in result["msg"]
    if "changed" in case:
        assert result["changed"] is case["changed"]
    if "warning" in case:
        # ansible-core >= 2.19 returns warnings as structured events: search their JSON.
        assert case["warning"] in json.dumps(result.get("warnings", [])), result
    if "broken" in case:
        assert result["broken"]["holder"] == case["broken"]
        assert "token" not in result["broken"]
    if "held_by" in case:
        info = _ledger.read_lock(str(path))
        if case["held_by"] is None and existing != "noinfo":
            assert info is None
        elif case["held_by"] is not None:
            assert info["holder"] == case["held_by"]
    if case["id"] == "take-free":
        info = _ledger.read_lock(str(path))
        assert result["token"] == info["token"]
        assert info["ttl"] == 3600
        assert abs(_ledger.epoch_from_iso(info["since"]) - time.time()) < 5


def _take(path, queue):
    info = _ledger.try_mkdir_lock(path, f"pid-{os.getpid()}", 60)
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
    assert _ledger.is_stale(dict(since=since, ttl=ttl), now=now) is stale
