"""Markers and the shared precondition of the release tests.

molecule/release runs every test here on one host and one converge. Molecule passes the files sorted, so
test_progressive.py, then test_progressive_experiment.py (progressive delivery, marked progressive), then
test_release.py (the release flow; its fault cases marked fault) run in that order. Each part starts from the state
the converge leaves: blue live serving demo version 1, no split. The progressive tests end there too, so the
``blue_live_v1`` fixture (which every test that starts from it uses) finds it and costs three reads; run out of
order (``-k``, ``-m fault``, a second ``molecule verify``), it establishes it with the release playbooks themselves.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
from playbook import play

FACT = "/etc/ansible/facts.d/sovereign.fact"
V1 = "/var/lib/sovereign/models/v1/model.pt"
# Loosened for the small shared test machine, as the tests' own FAST settings.
_LOOSE = {
    "deploy_smoke_requests": 10,
    "deploy_smoke_max_p99_ms": 1000,
    "deploy_watch_seconds": 4,
    "deploy_watch_max_p99_ms": 1000,
    "deploy_drain_timeout_s": 5,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: a fault case of the release flow")
    config.addinivalue_line("markers", "progressive: progressive delivery, canary and experiments (issue 14)")


def routing(host):
    """(live color, split weight, the version blue serves) as the host's map file and blue's runtime say."""
    fact = json.loads(host.file(FACT).content_string)
    switch, blue = fact["traffic_switch"], fact["runtime"]["colors"]["blue"]
    entries = {}
    for line in host.file(switch["map_file"]).content_string.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            entries[parts[0]] = parts[1]
    out = host.run(f"curl -sf --max-time 10 http://{blue['host']}:{blue['port']}/v2/models/demo")
    version = json.loads(out.stdout)["versions"][0] if out.rc == 0 else None
    return entries.get(switch["map_key"]), int(entries.get(switch["split"]["weight_key"], 0)), version


@pytest.fixture
def blue_live_v1(host):
    """Blue live serving demo version 1, no split: checked, and only when it does not hold put there by
    rollback.yml (a split: everything back on the live color) and deploy.yml (v1 to blue)."""
    live, weight, version = routing(host)
    if weight:
        rc, out, _seconds = play("rollback.yml", {"rollback_smoke_max_p99_ms": 1000})
        assert rc == 0, f"precondition (no split; found weight {weight}): rollback.yml failed: {out[-3000:]}"
        live, weight, version = routing(host)
    if live != "blue" or version != "1":
        rc, out, _seconds = play("deploy.yml", {"color": "blue", "model": V1, "model_version": "1", **_LOOSE})
        assert rc == 0, f"precondition (blue live with v1; found {live}, blue v{version}): deploy failed: {out[-3000:]}"
        live, weight, version = routing(host)
    assert (live, weight, version) == ("blue", 0, "1"), "precondition: blue live serving v1, no split"
