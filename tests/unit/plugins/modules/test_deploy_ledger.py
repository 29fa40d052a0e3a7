# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""deploy_ledger on real files in tmp_path (real prometheus_client), plus tables for the _ledger parsers."""

from __future__ import annotations

import json
import threading

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _ledger
from ansible_collections.sovereign.mlops.plugins.modules import deploy_ledger
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

MODEL_ENV = (
    "# managed\nSOVEREIGN_RUNTIME_MODEL_URI=/m/{v}/model.pt\nSOVEREIGN_RUNTIME_MODEL_NAME=demo\n"
    "SOVEREIGN_RUNTIME_MODEL_VERSION={v}\n"
)


@pytest.fixture
def host(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "blue.model.env").write_text(MODEL_ENV.format(v="1"))
    (tmp_path / "runtime" / "green.model.env").write_text(MODEL_ENV.format(v="2"))
    (tmp_path / "live.map").write_text("live green\n")
    return tmp_path


def _args(host, **extra):
    return dict(
        path=str(host / "ledger" / "deployments.jsonl"),
        metrics_path=str(host / "textfile" / "sovereign_deploy.prom"),
        config_dir=str(host / "runtime"),
        map_file=str(host / "live.map"),
        **extra,
    )


RECORD = dict(who="alice@ctl", host="infer-01", color="green", previous_color="blue", model_version="2")

CASES = [
    dict(
        id="append-success",
        records=[dict(RECORD, result="success", time="2026-03-01T12:00:00Z")],
        metrics=[
            'sovereign_deploy_live_color{color="green"} 1.0',
            'sovereign_deploy_live_color{color="blue"} 0.0',
            'sovereign_deploy_model_info{color="blue",model="demo",version="1"} 1.0',
            'sovereign_deploy_model_info{color="green",model="demo",version="2"} 1.0',
            'sovereign_deploy_last_success{action="deploy"} 1.0',
            'sovereign_deploy_last_timestamp_seconds{action="deploy"} 1.7723664e+09',
            'sovereign_deploy_operations{action="deploy",result="success"} 1.0',
        ],
    ),
    dict(
        id="failed-after-success",
        records=[dict(RECORD, result="success"), dict(RECORD, result="failed", reason="smoke test: golden")],
        metrics=[
            'sovereign_deploy_last_success{action="deploy"} 0.0',
            'sovereign_deploy_operations{action="deploy",result="failed"} 1.0',
            'sovereign_deploy_operations{action="deploy",result="success"} 1.0',
        ],
    ),
    dict(
        id="rollback-tracked-separately",
        records=[dict(RECORD, result="failed"), dict(RECORD, action="rollback", result="success")],
        metrics=[
            'sovereign_deploy_last_success{action="deploy"} 0.0',
            'sovereign_deploy_last_success{action="rollback"} 1.0',
        ],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_append_and_metrics(host, capsys, case):
    for record in case["records"]:
        result = run_module(deploy_ledger.main, _args(host, record=record), capsys)
        assert not result.get("failed"), result
        assert result["changed"] is True
        assert result["metrics_written"] is True
    lines = (host / "ledger" / "deployments.jsonl").read_text().splitlines()
    assert len(lines) == len(case["records"])
    parsed = [json.loads(line) for line in lines]
    for record, written in zip(case["records"], parsed, strict=True):
        assert {k: written[k] for k in record} == record
        assert written["time"].endswith("Z")
        assert written["action"] == record.get("action", "deploy")
    prom = (host / "textfile" / "sovereign_deploy.prom").read_text()
    for line in case["metrics"]:
        assert line in prom, prom
    assert oct((host / "textfile" / "sovereign_deploy.prom").stat().st_mode & 0o777) == "0o644"
    assert result["live_color"] == "green"
    assert result["models"]["blue"]["version"] == "1"


def test_check_mode_writes_nothing(host, capsys):
    result = run_module(deploy_ledger.main, _args(host, record=dict(RECORD, result="success")), capsys, check_mode=True)
    assert result["changed"] is True
    assert json.loads(result["line"])["color"] == "green"
    assert not (host / "ledger").exists()
    assert not (host / "textfile").exists()


def test_read_only_tail(host, capsys):
    for i in range(5):
        run_module(deploy_ledger.main, _args(host, record=dict(RECORD, result="success", n=i)), capsys)
    result = run_module(deploy_ledger.main, _args(host, tail=2), capsys)
    assert result["changed"] is False
    assert [r["n"] for r in result["records"]] == [3, 4]


def test_torn_last_line_is_skipped_and_next_record_starts_clean(host, capsys):
    ledger = host / "ledger" / "deployments.jsonl"
    ledger.parent.mkdir()
    ledger.write_text('{"result":"success","n":0}\n{"result":"succ')
    run_module(deploy_ledger.main, _args(host, record=dict(RECORD, result="success", n=1)), capsys)
    records = _ledger.read_ledger(str(ledger))
    assert [r["n"] for r in records] == [0, 1]


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = str(tmp_path / "l.jsonl")
    big = "x" * 5000

    def writer(n):
        for i in range(50):
            _ledger.append_record(path, dict(n=n, i=i, pad=big))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_ledger.read_ledger(path)) == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\nB=two words\n", {"A": "1", "B": "two words"}),
        ("# c\n\nA='q'\nB=\"d\"\n", {"A": "q", "B": "d"}),
        ("A=x=y\nnot a pair\n", {"A": "x=y"}),
        ("", {}),
    ],
)
def test_parse_env(text, expected):
    assert _ledger.parse_env(text) == expected


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("live blue\n", "live", "blue"),
        ("# comment\nlive green # trailing\n", "live", "green"),
        ("live blue\nlive green\n", "live", "green"),
        ("other blue\n", "live", None),
        (None, "live", None),
    ],
)
def test_map_value(text, key, expected):
    assert _ledger.map_value(text, key) == expected


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2026-03-01T12:00:00Z", 1772366400),
        ("2026-03-01T12:00:00.123Z", 1772366400),
        ("2026-03-01T12:00:00+00:00", 1772366400),
        ("yesterday", None),
        (None, None),
    ],
)
def test_epoch_from_iso(text, epoch):
    assert _ledger.epoch_from_iso(text) == epoch
