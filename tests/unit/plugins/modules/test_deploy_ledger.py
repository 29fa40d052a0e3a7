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
    dict(
        id="switched-back-after-a-degraded-watch",
        records=[
            dict(RECORD, result="failed", switched_back=True, reason="watch: degraded; traffic switched back to blue"),
            dict(RECORD, action="rollback", result="success", switched_back=False),
        ],
        metrics=[
            'sovereign_deploy_last_switched_back{action="deploy"} 1.0',
            'sovereign_deploy_last_switched_back{action="rollback"} 0.0',
            'sovereign_deploy_last_success{action="deploy"} 0.0',
        ],
    ),
    dict(
        id="a-success-after-it-clears-switched-back",
        records=[dict(RECORD, result="failed", switched_back=True), dict(RECORD, result="success")],
        metrics=['sovereign_deploy_last_switched_back{action="deploy"} 0.0'],
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


# -- lineage: the data version of each color's model, from the ledger -----------------------------------------------

REV1 = "1" * 40
REV2 = "2" * 40
MD5 = "3d7fd59556f8375d55d9d9d60743a422.dir"


def _deploy(version, color="blue", uri=None, **extra):
    return dict(RECORD, color=color, model_version=version, model_uri=uri or f"/m/{version}/model.pt", **extra)


LINEAGE_CASES = [
    dict(
        id="newest-record-of-that-model-wins",
        records=[
            _deploy("1", data_rev=REV1, data_md5="a", run_id="r1", result="success"),
            _deploy("2", color="green", data_rev=REV2, data_md5=MD5, run_id="r2", result="success"),
            _deploy("1", data_rev=REV2, data_md5="b", run_id="r1b", result="failed"),
        ],
        # blue serves /m/1 (MODEL_ENV): its newest record, a failed redeploy, still names the model's data.
        blue=dict(data_rev=REV2, data_md5="b", run_id="r1b"),
        green=dict(data_rev=REV2, data_md5=MD5, run_id="r2"),
    ),
    dict(
        id="other-color-same-model",
        records=[_deploy("2", color="blue", data_rev=REV2, data_md5=MD5, run_id="r2")],
        blue=dict(data_rev="", data_md5="", run_id=""),
        green=dict(data_rev=REV2, data_md5=MD5, run_id="r2"),
    ),
    dict(
        id="same-uri-other-version-does-not-match",
        records=[_deploy("7", uri="/m/1/model.pt", data_rev=REV1, data_md5="a", run_id="r")],
        blue=dict(data_rev="", data_md5="", run_id=""),
        green=dict(data_rev="", data_md5="", run_id=""),
    ),
    dict(
        id="records-before-lineage-are-skipped",
        records=[_deploy("1", data_rev=REV1, data_md5="a", run_id="r1"), _deploy("1")],
        blue=dict(data_rev=REV1, data_md5="a", run_id="r1"),
        green=dict(data_rev="", data_md5="", run_id=""),
    ),
    dict(
        id="trained-without-dvc",
        records=[_deploy("1", data_rev="", data_md5="", run_id="r1"), _deploy("2", color="green", data_rev=None)],
        blue=dict(data_rev="", data_md5="", run_id="r1"),
        green=dict(data_rev="", data_md5="", run_id=""),
    ),
]


@pytest.mark.parametrize("case", LINEAGE_CASES, ids=[c["id"] for c in LINEAGE_CASES])
def test_color_lineage_from_the_ledger(host, capsys, case):
    for record in case["records"]:
        result = run_module(deploy_ledger.main, _args(host, record=record), capsys)
        assert not result.get("failed"), result
    for color in ("blue", "green"):
        model = result["models"][color]
        assert {k: model[k] for k in _ledger.LINEAGE_FIELDS} == case[color], color
    prom = (host / "textfile" / "sovereign_deploy.prom").read_text()
    for color in ("blue", "green"):
        want = case[color]
        labels = f'color="{color}",data_md5="{want["data_md5"]}",data_rev="{want["data_rev"]}"'
        line = f"sovereign_deploy_model_data_info{{{labels}}} 1.0"
        assert (line in prom) is bool(want["data_rev"] or want["data_md5"]), prom
    assert prom.count("sovereign_deploy_model_data_info{") <= 2


@pytest.mark.parametrize(
    ("value", "stored"),
    [("abc", "abc"), (None, ""), (7, "7"), ("", "")],
)
def test_lineage_values_are_stored_as_strings(host, capsys, value, stored):
    run_module(deploy_ledger.main, _args(host, record=_deploy("1", data_rev=value, data_md5=value)), capsys)
    written = json.loads((host / "ledger" / "deployments.jsonl").read_text())
    assert (written["data_rev"], written["data_md5"]) == (stored, stored)
    assert "run_id" not in written  # only the lineage keys given are normalised, none is added


def test_rollback_records_the_target_colors_data_version(host, capsys):
    """What rollback.yml does: read the ledger (models), then record the target color's lineage."""
    run_module(deploy_ledger.main, _args(host, record=_deploy("1", data_rev=REV1, data_md5="a", run_id="r1")), capsys)
    run_module(deploy_ledger.main, _args(host, record=_deploy("2", "green", data_rev=REV2, data_md5=MD5)), capsys)
    state = run_module(deploy_ledger.main, _args(host, tail=50), capsys)
    target = state["models"]["blue"]
    record = dict(
        action="rollback",
        color="blue",
        previous_color="green",
        model_uri=target["uri"],
        model_version=target["version"],
        **{k: target[k] for k in _ledger.LINEAGE_FIELDS},
    )
    result = run_module(deploy_ledger.main, _args(host, record=record), capsys)
    assert json.loads(result["line"])["data_rev"] == REV1
    # ... and a later lookup of blue's model still finds it, now from the rollback record.
    assert result["models"]["blue"]["data_rev"] == REV1


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


def _contract(root):
    """A host contract whose layout differs from every built-in default (as a role with changed defaults
    publishes it)."""
    return dict(
        version=1,
        runtime=dict(
            config_dir=str(root / "cfg"),
            colors=dict(
                blue=dict(host="127.0.0.1", port=9101, model_env=str(root / "cfg" / "b" / "model.env")),
                green=dict(host="127.0.0.1", port=9102, model_env=str(root / "cfg" / "g" / "model.env")),
            ),
        ),
        traffic_switch=dict(map_file=str(root / "maps" / "colors.map"), map_key="current"),
        release=dict(ledger=str(root / "state" / "ledger.jsonl"), metrics_file=str(root / "prom" / "deploy.prom")),
    )


@pytest.fixture
def moved_host(tmp_path):
    for color, version in (("b", "3"), ("g", "4")):
        (tmp_path / "cfg" / color).mkdir(parents=True)
        (tmp_path / "cfg" / color / "model.env").write_text(MODEL_ENV.format(v=version))
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "colors.map").write_text("live blue\ncurrent green\n")
    return tmp_path


def test_paths_default_from_the_contract(moved_host, capsys):
    """Only the contract is given: the ledger, metrics, map file and key and each color's model file come from
    it, none from the built-in defaults."""
    contract = _contract(moved_host)
    record = dict(RECORD, result="success", time="2026-03-01T12:00:00Z")
    result = run_module(deploy_ledger.main, dict(contract=contract, record=record, tail=1), capsys)
    assert not result.get("failed"), result
    assert result["live_color"] == "green"  # the 'current' key, not 'live'
    assert (result["models"]["blue"]["version"], result["models"]["green"]["version"]) == ("3", "4")
    assert result["records"][0]["who"] == "alice@ctl"
    assert (moved_host / "state" / "ledger.jsonl").read_text().count("\n") == 1
    prom = (moved_host / "prom" / "deploy.prom").read_text()
    assert 'sovereign_deploy_live_color{color="green"} 1.0' in prom
    assert 'sovereign_deploy_model_info{color="blue",model="demo",version="3"} 1.0' in prom


def test_explicit_options_win_over_the_contract(moved_host, host, capsys):
    """The old callers' arguments keep their meaning when a contract is passed too."""
    args = _args(host, contract=_contract(moved_host), map_key="live", tail=0, refresh_metrics=True)
    result = run_module(deploy_ledger.main, args, capsys)
    assert not result.get("failed"), result
    assert result["live_color"] == "green"  # live.map's 'live', not colors.map's 'current'
    assert (result["models"]["blue"]["version"], result["models"]["green"]["version"]) == ("1", "2")
    assert (host / "textfile" / "sovereign_deploy.prom").exists()
    assert not (moved_host / "prom").exists()
