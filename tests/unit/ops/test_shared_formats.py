"""One format, two readers: the collection's module_utils (on the hosts, inside modules) and sovereign-ops (the
ledger parsed on the controller; the map and env files read by its probe on the host, where nothing of the
collection exists). Why copies and not imports: docs/adr/0901-sovereign-ops-reads-through-ansible.md. These
tables hold both readers to the same answers; change both, or neither."""

from __future__ import annotations

import json

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _files as FILES
from ansible_collections.sovereign.mlops.plugins.module_utils import _ledger
from sovereign_ops import fleet, probe

DEPLOY = dict(
    action="deploy",
    time="2026-03-01T12:00:00Z",
    host="infer-01",
    color="green",
    previous_color="blue",
    model_name="churn",
    model_version="3",
    model_uri="models:/churn/3",
    data_rev="528ab3d4e1c2f0a9b8c7d6e5f4a3b2c1d0e9f8a7",
    data_md5="3d7fd59556f8375d55d9d9d60743a422.dir",
    run_id="4ec69dfa0b1c4d2e8f3a5b6c7d8e9f01",
    result="success",
    who="alice@ctl",
)

LINES = [
    pytest.param(json.dumps(DEPLOY, sort_keys=True, separators=(",", ":")), [DEPLOY], id="as-append_record-writes"),
    pytest.param(json.dumps(DEPLOY, indent=None), [DEPLOY], id="spaces"),
    pytest.param("  " + json.dumps(DEPLOY) + "  \r", [DEPLOY], id="surrounding-whitespace-and-cr"),
    pytest.param("", [], id="empty"),
    pytest.param("\n\n", [], id="blank-lines"),
    pytest.param('{"result":"succ', [], id="torn-last-line"),
    pytest.param('{"n":1}\n{"n":', [{"n": 1}], id="good-then-torn"),
    pytest.param('[1,2]\n"text"\n3\nnull', [], id="json-but-not-an-object"),
    pytest.param('{"n":1}{"n":2}', [], id="two-objects-on-one-line"),
    pytest.param('{"a":{"b":[1,null]},"s":"\\u00e9"}', [{"a": {"b": [1, None]}, "s": "é"}], id="nested-and-unicode"),
    pytest.param('{"n":1}\nnot json\n{"n":2}', [{"n": 1}, {"n": 2}], id="garbage-between"),
    pytest.param('{"data_rev":"","n":1}', [{"data_rev": "", "n": 1}], id="record-before-lineage-or-without-dvc"),
]


@pytest.mark.parametrize(("text", "expected"), LINES)
def test_both_parsers_agree(text, expected):
    collection = _ledger.parse_ledger(text)
    cli = fleet.parse_ledger("infer-01", text)
    assert collection == expected
    # The CLI's only addition: the host it read the ledger from, when a record does not name one.
    assert cli == [dict(r, host=r.get("host", "infer-01")) for r in collection]


def test_what_append_record_writes_the_cli_reads(tmp_path):
    path = str(tmp_path / "deployments.jsonl")
    for record in (DEPLOY, dict(DEPLOY, action="rollback", data_rev="", data_md5="")):
        _ledger.append_record(path, record)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert fleet.parse_ledger("x", text) == _ledger.read_ledger(path)


@pytest.mark.parametrize(
    ("record", "cell"),
    [
        pytest.param(DEPLOY, "528ab3d4", id="rev-short"),
        pytest.param(dict(DEPLOY, data_rev=""), "md5:3d7fd595", id="md5-only"),
        pytest.param(dict(DEPLOY, data_rev="", data_md5=""), "-", id="trained-without-dvc"),
        pytest.param({k: v for k, v in DEPLOY.items() if not k.startswith("data_")}, "-", id="record-before-lineage"),
        pytest.param(dict(DEPLOY, data_rev=None), "md5:3d7fd595", id="null"),
    ],
)
def test_history_shows_the_short_data_rev(record, cell):
    assert fleet.short_data_rev(record) == cell
    header, row = fleet.format_history([record]).splitlines()
    start = header.index("DATA")
    assert row[start:].split()[0] == cell
    assert row[header.index("WHO") :].startswith(DEPLOY["who"])  # the columns after it stay aligned


MAPS = [
    pytest.param("live blue\n", "live", id="plain"),
    pytest.param("# comment\nlive green\n", "live", id="comment"),
    pytest.param("live blue\nlive green\n", "live", id="last-wins"),
    pytest.param("  live   green  \n", "live", id="spaces"),
    pytest.param("current green\nlive blue\n", "current", id="other-key"),
    pytest.param("other blue\n", "live", id="absent"),
    pytest.param("", "live", id="empty"),
    pytest.param("live\n", "live", id="key-without-value"),
]


@pytest.mark.parametrize(("text", "key"), MAPS)
def test_map_readers_agree(text, key):
    assert probe.map_value(text, key) == FILES.map_value(text, key)


ENVS = [
    pytest.param("SOVEREIGN_RUNTIME_MODEL_NAME=churn\n", id="bare"),
    pytest.param("# managed\nSOVEREIGN_RUNTIME_MODEL_VERSION=7\n\n", id="comment-and-blank"),
    pytest.param("SOVEREIGN_RUNTIME_MODEL_URI=models:/churn@champion\n", id="uri"),
    pytest.param("SOVEREIGN_RUNTIME_MODEL_NAME='churn model'\n", id="single-quoted"),
    pytest.param('SOVEREIGN_RUNTIME_MODEL_NAME="churn model"\n', id="double-quoted"),
    pytest.param('SOVEREIGN_RUNTIME_MODEL_URI="/srv/m/\\"x\\".pt"\n', id="double-quoted-escapes"),
    pytest.param("A=1\nA=2\n", id="last-wins"),
    pytest.param("SOVEREIGN_RUNTIME_MODEL_VERSION=\n", id="empty-value"),
    pytest.param("no equals sign\nA=1\n", id="not-an-assignment"),
]


@pytest.mark.parametrize("text", ENVS)
def test_env_readers_agree(text):
    assert probe.parse_env(text) == FILES.parse_env(text)
