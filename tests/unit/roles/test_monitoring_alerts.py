"""Every alert the collection ships follows the convention of ADR 1520 (ARCHITECTURE §7).

Files: ``roles/<role>/files/monitoring/alerts.yml`` (rule groups) with ``alerts_test.yml`` beside it. Checked here,
statically: one group per role named ``sovereign.<role>`` (unique across roles); every alert with a ``severity``
label (critical, warning or info) and the annotations ``summary``, ``description`` and ``runbook_url``; the
runbook URL is ``<galaxy.yml repository>/blob/main/docs/runbooks/<file>.md#<alert name in lower case>`` and that
file exists with a heading that makes the anchor; alert names unique across roles; every alert has, in its
role's alerts_test.yml, a case where it fires and one where it is expected silent. That the rules parse and
the tests pass is promtool's job (``make rules``, scripts/promtool-test.sh), run for real there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RUNBOOKS = ROOT / "docs" / "runbooks"
RULE_FILES = sorted(ROOT.glob("roles/*/files/monitoring/alerts.yml"))
SEVERITIES = {"critical", "warning", "info"}
ANNOTATIONS = ("summary", "description", "runbook_url")


def runbook_base() -> str:
    repository = yaml.safe_load((ROOT / "galaxy.yml").read_text())["repository"].rstrip("/")
    return f"{repository}/blob/main/docs/runbooks/"


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub-style renderers make of a Markdown file's headings: lower case, punctuation other
    than '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not in_code:
            text = re.sub(r"[`*]", "", match.group(1)).strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text)))
    return anchors


def alerts_of(path: Path) -> list[dict]:
    doc = yaml.safe_load(path.read_text()) or {}
    return [rule for group in doc.get("groups") or [] for rule in group.get("rules") or [] if "alert" in rule]


def test_there_are_rule_files():
    assert RULE_FILES, "no roles/*/files/monitoring/alerts.yml"


def test_heading_anchors():
    assert heading_anchors("# Runbook: x\n## `InferenceLatencyP99High`\n```\n# not a heading\n```\n") == {
        "runbook-x",
        "inferencelatencyp99high",
    }


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.parts[-4])
def test_groups_named_after_their_role(path: Path):
    role = path.parts[-4]
    doc = yaml.safe_load(path.read_text())
    names = [group["name"] for group in doc["groups"]]
    assert names, f"{path}: no rule groups"
    for name in names:
        assert name == f"sovereign.{role}" or name.startswith(f"sovereign.{role}."), (
            f"{path}: group {name!r} must be named sovereign.{role} (or sovereign.{role}.<part>)"
        )


def test_group_and_alert_names_unique_across_roles():
    groups: dict[str, Path] = {}
    alerts: dict[str, Path] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            assert group["name"] not in groups, f"group {group['name']} in {groups.get(group['name'])} and {path}"
            groups[group["name"]] = path
        for rule in alerts_of(path):
            other = alerts.setdefault(rule["alert"], path)
            assert other == path, f"alert {rule['alert']} in {other} and {path}: one role owns an alert name"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.parts[-4])
def test_every_alert_has_severity_annotations_and_an_existing_runbook(path: Path):
    base = runbook_base()
    problems = []
    for rule in alerts_of(path):
        name = rule["alert"]
        severity = (rule.get("labels") or {}).get("severity")
        if severity not in SEVERITIES:
            problems.append(f"{name}: labels.severity is {severity!r}, not one of {sorted(SEVERITIES)}")
        annotations = rule.get("annotations") or {}
        problems += [f"{name}: no annotation {key!r}" for key in ANNOTATIONS if not str(annotations.get(key, ""))]
        url = str(annotations.get("runbook_url", ""))
        if not url.startswith(base):
            problems.append(f"{name}: runbook_url {url!r} does not start with {base!r}")
            continue
        file, _sep, anchor = url[len(base) :].partition("#")
        runbook = RUNBOOKS / file
        if not re.fullmatch(r"[a-z0-9-]+\.md", file) or not runbook.is_file():
            problems.append(f"{name}: runbook_url names docs/runbooks/{file}, which does not exist")
            continue
        if anchor != name.lower():
            problems.append(f"{name}: runbook_url's anchor is {anchor!r}, must be {name.lower()!r}")
        elif anchor not in heading_anchors(runbook.read_text()):
            problems.append(f"{name}: docs/runbooks/{file} has no heading '## {name}' (anchor #{anchor})")
    assert not problems, f"{path}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.parts[-4])
def test_every_alert_is_tested_firing_and_silent(path: Path):
    test_file = path.with_name("alerts_test.yml")
    assert test_file.is_file(), f"{path}: no alerts_test.yml beside it"
    doc = yaml.safe_load(test_file.read_text())
    assert "alerts.yml" in (doc.get("rule_files") or []), f"{test_file}: rule_files must list alerts.yml"
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc.get("tests") or []:
        for check in case.get("alert_rule_test") or []:
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts_of(path)}
    problems = [f"{n}: no test where it fires" for n in sorted(names - fires)]
    problems += [f"{n}: no test where it stays silent (under the threshold, resolved)" for n in sorted(names - silent)]
    problems += [f"{n}: tested but not an alert of {path.name}" for n in sorted((fires | silent) - names)]
    assert not problems, f"{test_file}:\n" + "\n".join(problems)


# The alerts issue 15 names, each shipped by the role that owns what it watches.
REQUIRED = {
    "SovereignTargetDown": "prometheus",
    "InferenceRuntimeDown": "inference_runtime",
    "InferenceLiveColorNotReady": "inference_runtime",
    "InferenceLatencyP99High": "inference_runtime",
    "InferenceErrorRatioHigh": "inference_runtime",
    "InferenceQueueSaturated": "inference_runtime",
    "DeployFailed": "release",
    "DeployAutoRolledBack": "release",
    "NodeFilesystemFillingUp": "common",
    "NodeMemoryPressure": "common",
    "MLflowDown": "mlflow",
    "TextfileMetricsStale": "common",
}


def test_the_required_alerts_are_shipped_by_their_roles():
    owners = {rule["alert"]: path.parts[-4] for path in RULE_FILES for rule in alerts_of(path)}
    assert {name: owners.get(name) for name in REQUIRED} == REQUIRED
