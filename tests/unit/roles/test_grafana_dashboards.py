"""Every dashboard the grafana role provisions is valid and provisionable, and every query in it parses.

Grafana's server cannot be installed on these machines (no reachable registry carries it), so the dashboards are
checked here without it: structurally (what Grafana's file provisioning needs: a JSON object with a unique uid and
a title, panels with unique ids, a type, a gridPos inside the 24-column grid, datasources by the uids the role
provisions), and every PromQL expression (panel targets, annotations, variables) wrapped as a recording rule in a
temporary rule file and parsed by ``promtool check rules`` (Debian's prometheus 2.42, make bootstrap). Whether the
core panels return data is checked on the lab against the real Prometheus: scripts/check-dashboards.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ansible_collections.sovereign.mlops.tests.unit.plugins.module_utils.prometheus_fixture import (
    PrometheusProcess,
    RuntimeMetrics,
    drive,
    free_port,
    needs_prometheus,
)

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("check_dashboards", ROOT / "scripts" / "check-dashboards.py")
check_dashboards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_dashboards)

FILES = check_dashboards.dashboard_files(ROOT)
GRAFANA_VARS = yaml.safe_load((ROOT / "roles" / "grafana" / "vars" / "main.yml").read_text())
DATASOURCE_UIDS = {GRAFANA_VARS["_grafana_prometheus_uid"], GRAFANA_VARS["_grafana_alertmanager_uid"], "-- Grafana --"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_role_ships_its_dashboards():
    names = {p.name for p in FILES}
    assert {"platform-overview.json", "inference-host.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dashboard_is_provisionable(path: Path):
    dashboard = _load(path)
    problems = []
    if not isinstance(dashboard.get("uid"), str) or not 0 < len(dashboard["uid"]) <= 40:
        problems.append(f"uid {dashboard.get('uid')!r}: a string of 1 to 40 characters")
    if not dashboard.get("title"):
        problems.append("no title")
    if "id" in dashboard and dashboard["id"] is not None:
        problems.append("a provisioned dashboard must not carry a database id")
    if not isinstance(dashboard.get("schemaVersion"), int):
        problems.append("no integer schemaVersion")
    ids = []
    for panel in check_dashboards.panels(dashboard):
        title = panel.get("title", "?")
        ids.append(panel.get("id"))
        if not isinstance(panel.get("id"), int) or not panel.get("type"):
            problems.append(f"panel {title!r}: needs an integer id and a type")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            problems.append(f"panel {title!r}: gridPos {grid} must have integer h, w, x, y with x + w <= 24")
        for target in panel.get("targets") or []:
            datasource = target.get("datasource") or panel.get("datasource") or {}
            if datasource.get("uid") not in DATASOURCE_UIDS and not str(datasource.get("uid", "")).startswith("$"):
                problems.append(f"panel {title!r}: datasource uid {datasource.get('uid')!r} is not provisioned")
            if not target.get("refId") or not target.get("expr"):
                problems.append(f"panel {title!r}: a target without refId or expr")
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}")
    assert not problems, f"{path}:\n" + "\n".join(problems)


def test_uids_unique_across_dashboards():
    uids = [_load(p)["uid"] for p in FILES]
    assert len(uids) == len(set(uids)), uids


def test_overview_has_the_panels_the_issue_asks_for():
    overview = _load(ROOT / "roles" / "grafana" / "files" / "dashboards" / "platform-overview.json")
    text = json.dumps(overview)
    for metric in (
        "sovereign_deploy_live_color",
        "sovereign_runtime_requests_total",
        "sovereign_runtime_request_duration_seconds_bucket",
        "sovereign_runtime_batch_size",
        "sovereign_runtime_queue_depth",
        "sovereign_deploy_model_info",
        "sovereign_deploy_model_data_info",
    ):
        assert metric in text, metric
    assert {a["name"] for a in overview["annotations"]["list"]} >= {"Deploys", "Rollbacks"}


def test_substitute_replaces_grafana_variables():
    values = dict(check_dashboards.VARIABLES, host="inf-01")
    assert check_dashboards.substitute('rate(x{host="$host"}[$__rate_interval]) ${host:raw}', values) == (
        'rate(x{host="inf-01"}[1m]) inf-01'
    )
    with pytest.raises(KeyError, match=r"\$nope"):
        check_dashboards.substitute('x{a="$nope"}', values)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian package prometheus: make bootstrap)")
def test_every_query_parses(tmp_path: Path):
    values = dict(check_dashboards.VARIABLES, host="inf-01")
    rules = []
    for path in FILES:
        for i, (title, expr) in enumerate(check_dashboards.expressions(_load(path))):
            if expr.startswith("label_values("):
                continue
            rules.append(
                {
                    "record": f"dashboard:{path.stem.replace('-', '_')}:{i}",
                    "expr": check_dashboards.substitute(expr, values),
                    "labels": {"panel": title[:60]},
                }
            )
    for path in FILES:
        for var in (_load(path).get("templating") or {}).get("list") or []:
            query = (
                (var.get("query") or {}).get("query", "")
                if isinstance(var.get("query"), dict)
                else var.get("query", "")
            )
            inner = (
                query.removeprefix("label_values(").rsplit(",", 1)[0] if query.startswith("label_values(") else query
            )
            if inner:
                rules.append({"record": f"dashboard:variable:{var['name']}", "expr": inner})
    assert len(rules) > 20
    rule_file = tmp_path / "dashboards.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@needs_prometheus
def test_check_dashboards_asks_a_real_prometheus(capsys):
    """scripts/check-dashboards.py against a real Prometheus scraping a runtime-shaped page (only the runtime's
    request metrics: the panels over them report data, the others - ledger, HAProxy, node - fail, exit 1)."""
    metrics = RuntimeMetrics()
    prom = PrometheusProcess({f"127.0.0.1:{metrics.port}": {"host": "inf-01", "color": "green"}})
    try:
        prom.wait_targets_up(1)
        drive(metrics, 2.5, ok=100, errors=1, slow_per_100=1)
        assert check_dashboards.main(["--prometheus", prom.url]) == 1
    finally:
        prom.close()
        metrics.close()
    out = capsys.readouterr().out
    assert "$host=inf-01" in out
    assert "ok   Infer request rate by host and color" in out
    assert "ok   Latency p50 and p99 by host and color" in out
    assert "FAIL Live color per host" in out
    assert "--   Firing alerts" in out
    assert "core panel(s) without data" in out


def test_check_dashboards_names_an_unreachable_prometheus(capsys):
    assert check_dashboards.main(["--prometheus", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot query" in capsys.readouterr().err
