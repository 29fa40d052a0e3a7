# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""feature_flag on real files in tmp_path, checked with the real jsonschema; the files it writes are read back by
flagd's own evaluator (openfeature-flagd-core, what the runtime's provider evaluates with). No double."""

from __future__ import annotations

import json
import os
import stat

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _flagd
from ansible_collections.sovereign.mlops.plugins.modules import feature_flag
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

SWITCH = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"}
FLAGS = {
    "runtime-batching": SWITCH,
    "new-ranking": {
        "state": "ENABLED",
        "variants": {"on": True, "off": False},
        "defaultVariant": "off",
        "targeting": {"fractional": [{"var": "targetingKey"}, ["on", 10], ["off", 90]]},
    },
    "greeting": {
        "state": "ENABLED",
        "variants": {"plain": "hello", "warm": "welcome back"},
        "defaultVariant": "plain",
        "targeting": {"if": [{"==": [{"var": "color"}, "green"]}, "warm", None]},
    },
    "max-rows": {"state": "DISABLED", "variants": {"small": 8, "large": 64}, "defaultVariant": "small"},
}


@pytest.fixture
def flag_file(tmp_path):
    path = tmp_path / "flags.json"
    path.write_text(_flagd.render(_flagd.build(FLAGS)))
    return path


def flags_of(path):
    return json.loads(path.read_text())["flags"]


# (id, module args, what the changed flag must look like afterwards)
CHANGES = [
    ("default-variant", {"flag": "runtime-batching", "default_variant": "off"},
     lambda f: f["runtime-batching"]["defaultVariant"] == "off"),
    ("disable", {"flag": "runtime-batching", "enabled": False}, lambda f: f["runtime-batching"]["state"] == "DISABLED"),
    ("enable", {"flag": "max-rows", "enabled": True}, lambda f: f["max-rows"]["state"] == "ENABLED"),
    ("number-default", {"flag": "max-rows", "default_variant": "large"},
     lambda f: f["max-rows"]["defaultVariant"] == "large"),
    ("percentage-keeps-bucketing", {"flag": "new-ranking", "percentage": 50},
     lambda f: f["new-ranking"]["targeting"] == {"fractional": [{"var": "targetingKey"}, ["on", 50], ["off", 50]]}),
    ("percentage-0", {"flag": "new-ranking", "percentage": 0},
     lambda f: f["new-ranking"]["targeting"]["fractional"][1:] == [["on", 0], ["off", 100]]),
    ("percentage-100", {"flag": "new-ranking", "percentage": 100},
     lambda f: f["new-ranking"]["targeting"]["fractional"][1:] == [["on", 100], ["off", 0]]),
    ("first-rollout", {"flag": "runtime-batching", "percentage": 25, "rollout_variant": "off"},
     lambda f: f["runtime-batching"]["targeting"] == {"fractional": [["off", 25], ["on", 75]]}),
    ("swap-rollout-variant", {"flag": "new-ranking", "percentage": 30, "rollout_variant": "off"},
     lambda f: f["new-ranking"]["targeting"]["fractional"][1:] == [["off", 30], ["on", 70]]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expect"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_changes_one_flag_and_nothing_else(flag_file, capsys, args, expect):
    before = flags_of(flag_file)
    checked = run_module(feature_flag.main, {"path": str(flag_file), **args}, capsys, check_mode=True, diff=True)
    assert checked["changed"] is True and checked["diff"]["before"] != checked["diff"]["after"]
    assert flags_of(flag_file) == before  # check mode wrote nothing
    result = run_module(feature_flag.main, {"path": str(flag_file), **args}, capsys, diff=True)
    assert result["changed"] is True
    after = flags_of(flag_file)
    assert expect(after)
    assert json.loads(result["diff"]["after"]) == json.loads(flag_file.read_text())
    assert {k: v for k, v in after.items() if k != args["flag"]} == {
        k: v for k, v in before.items() if k != args["flag"]
    }
    assert _flagd.problems(json.loads(flag_file.read_text())) == []
    again = run_module(feature_flag.main, {"path": str(flag_file), **args}, capsys)
    assert again["changed"] is False  # idempotent


# (id, module args, words the failure message must hold)
BAD = [
    ("unknown-flag", {"flag": "nope", "enabled": True}, ["'nope'", "not in", "runtime-batching"]),
    ("percentage-above-100", {"flag": "new-ranking", "percentage": 101}, ["101", "outside 0-100"]),
    ("percentage-negative", {"flag": "new-ranking", "percentage": -1}, ["-1", "outside 0-100"]),
    ("unknown-default-variant", {"flag": "runtime-batching", "default_variant": "maybe"}, ["'maybe'", "not one of"]),
    ("unknown-rollout-variant", {"flag": "new-ranking", "percentage": 5, "rollout_variant": "x"},
     ["'x'", "not one of"]),
    ("percentage-on-a-rule", {"flag": "greeting", "percentage": 5}, ["'greeting'", "not one top-level"]),
    ("first-rollout-without-variant", {"flag": "runtime-batching", "percentage": 5}, ["rollout_variant"]),
    ("nothing-to-change", {"flag": "runtime-batching"}, ["nothing to change"]),
    ("rollout-variant-alone", {"flag": "runtime-batching", "enabled": True, "rollout_variant": "on"},
     ["needs percentage"]),
    ("bad-mode", {"flag": "runtime-batching", "enabled": True, "mode": "rw"}, ["'rw'", "octal"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_fails_naming_the_problem_and_changes_nothing(flag_file, capsys, args, words):
    before = flag_file.read_bytes()
    result = run_module(feature_flag.main, {"path": str(flag_file), **args}, capsys)
    assert result.get("failed") is True
    for word in words:
        assert word in result["msg"], result["msg"]
    assert flag_file.read_bytes() == before


# (id, a flag file that fails the schema, words of the message)
BAD_FILES = [
    ("not-json", "{not json", ["is not JSON"]),
    ("no-flags", {"$schema": _flagd.SCHEMA_URL}, ["'flags' is a required property"]),
    ("bad-state", {"flags": {"a": dict(SWITCH, state="ON")}}, ["/flags/a/state", "'ON'"]),
    ("mixed-variant-types", {"flags": {"a": dict(SWITCH, variants={"on": True, "off": "no"})}}, ["/flags/a/variants"]),
    ("empty-variants", {"flags": {"a": dict(SWITCH, variants={})}}, ["/flags/a/variants"]),
    ("unknown-key", {"flags": {"a": dict(SWITCH, enabled=True)}}, ["/flags/a", "'enabled'"]),
    ("default-not-a-variant", {"flags": {"a": dict(SWITCH, defaultVariant="maybe")}}, ["/flags/a/defaultVariant"]),
    ("negative-weight", {"flags": {"a": dict(SWITCH, targeting={"fractional": [["on", -5], ["off", 105]]})}},
     ["/flags/a/targeting"]),
    ("decimal-weight", {"flags": {"a": dict(SWITCH, targeting={"fractional": [["on", 2.5], ["off", 97.5]]})}},
     ["/flags/a/targeting"]),
    ("fractional-unknown-variant", {"flags": {"a": dict(SWITCH, targeting={"fractional": [["yes", 5], ["off", 95]]})}},
     ["fractional names 'yes'"]),
    ("zero-weights", {"flags": {"a": dict(SWITCH, targeting={"fractional": [["on", 0], ["off", 0]]})}},
     ["sum to 0"]),
]  # fmt: skip


@pytest.mark.parametrize(("content", "words"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_file_that_fails_the_schema_is_refused_as_input_and_as_definitions(tmp_path, capsys, content, words):
    path = tmp_path / "flags.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = path.read_bytes()
    edit = run_module(feature_flag.main, {"path": str(path), "flag": "a", "enabled": False}, capsys)
    assert edit.get("failed") is True
    for word in words:
        assert word in edit["msg"], edit["msg"]
    assert path.read_bytes() == before
    if isinstance(content, dict) and "flags" in content:
        target = tmp_path / "written.json"
        whole = run_module(feature_flag.main, {"path": str(target), "definitions": content["flags"]}, capsys)
        assert whole.get("failed") is True and "the flag definitions given fail" in whole["msg"], whole
        assert not target.exists()


def test_definitions_write_the_whole_file_atomically_with_mode_and_stay_idempotent(tmp_path, capsys):
    path = tmp_path / "flags.json"
    args = {"path": str(path), "definitions": FLAGS, "metadata": {"owner": "ops"}, "mode": "0640"}
    checked = run_module(feature_flag.main, args, capsys, check_mode=True, diff=True)
    assert checked["changed"] is True and checked["diff"]["before"] == "" and not path.exists()
    assert run_module(feature_flag.main, args, capsys)["changed"] is True
    doc = json.loads(path.read_text())
    assert doc["$schema"] == _flagd.SCHEMA_URL and doc["flags"] == FLAGS and doc["metadata"] == {"owner": "ops"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["flags.json"]  # no temporary file left
    assert run_module(feature_flag.main, args, capsys)["changed"] is False
    os.chmod(path, 0o600)
    fixed = run_module(feature_flag.main, args, capsys)
    assert fixed["changed"] is True and stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_missing_file_is_not_edited(tmp_path, capsys):
    result = run_module(feature_flag.main, {"path": str(tmp_path / "none.json"), "flag": "a", "enabled": True}, capsys)
    assert result["failed"] is True and "does not exist" in result["msg"]


def test_flagd_evaluates_the_written_rollout_at_the_percentage(flag_file, capsys):
    """The file the module wrote, evaluated by flagd's own evaluator (openfeature-flagd-core): 30 % of 2000 keys."""
    core = pytest.importorskip("openfeature.contrib.tools.flagd.core")
    from openfeature.evaluation_context import EvaluationContext

    run_module(feature_flag.main, {"path": str(flag_file), "flag": "new-ranking", "percentage": 30}, capsys)
    evaluator = core.FlagdCore()
    evaluator.set_flags(flag_file.read_text())
    hits = sum(
        evaluator.resolve_boolean_value("new-ranking", False, EvaluationContext(f"user-{i}")).value for i in range(2000)
    )
    assert 0.26 < hits / 2000 < 0.34, hits
