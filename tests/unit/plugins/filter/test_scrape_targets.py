# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""plugins/filter/scrape_targets.py: file_sd target groups from host contracts (docs/architecture.md)."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.sovereign.mlops.plugins.filter.scrape_targets import scrape_targets


def contract(internal, metrics):
    return {"ansible_local": {"sovereign": {"common": {"internal_address": internal}, "metrics": metrics}}}


HOSTVARS = {
    "infer-01": contract(
        "10.0.0.5",
        {
            "node_exporter": {"job": "node_exporter", "address": "10.0.0.5", "port": 9100, "path": "/metrics"},
            "sovereign_runtime_blue": {
                "job": "sovereign_runtime",
                "address": "10.0.0.5",
                "port": 8001,
                "labels": {"color": "blue"},
            },
            "sovereign_runtime_green": {
                "job": "sovereign_runtime",
                "address": "10.0.0.5",
                "port": 8002,
                "labels": {"color": "green"},
            },
        },
    ),
    "ops-01": contract(
        "10.0.0.9",
        {
            "node_exporter": {"job": "node_exporter", "address": "0.0.0.0", "port": 9100},
            "mlflow": {"job": "mlflow", "address": "fd00::9", "port": 5000, "auth": True, "scheme": "https"},
        },
    ),
    "gone-01": {},
}


def test_one_job_per_endpoint_job_with_host_and_color_labels():
    jobs = scrape_targets(HOSTVARS, ["infer-01", "ops-01"])
    assert sorted(jobs) == ["mlflow", "node_exporter", "sovereign_runtime"]
    runtime = jobs["sovereign_runtime"]["targets"]
    assert [g["targets"] for g in runtime] == [["10.0.0.5:8001"], ["10.0.0.5:8002"]]
    assert [g["labels"]["color"] for g in runtime] == ["blue", "green"]
    assert {g["labels"]["host"] for g in runtime} == {"infer-01"}
    assert runtime[0]["labels"]["__metrics_path__"] == "/metrics"
    assert jobs["sovereign_runtime"]["auth"] is False


def test_wildcard_is_scraped_at_the_internal_address_and_ipv6_is_bracketed():
    jobs = scrape_targets(HOSTVARS, ["ops-01"])
    assert jobs["node_exporter"]["targets"][0]["targets"] == ["10.0.0.9:9100"]
    mlflow = jobs["mlflow"]
    assert mlflow["auth"] is True
    assert mlflow["targets"][0]["targets"] == ["[fd00::9]:5000"]
    assert mlflow["targets"][0]["labels"]["__scheme__"] == "https"


def test_a_host_without_a_contract_keeps_its_previous_targets():
    previous = {
        "node_exporter": [
            {"targets": ["10.0.0.7:9100"], "labels": {"host": "gone-01"}},
            {"targets": ["10.0.0.5:9100"], "labels": {"host": "infer-01"}},
        ]
    }
    jobs = scrape_targets(HOSTVARS, ["infer-01", "gone-01"], previous=previous)
    groups = jobs["node_exporter"]["targets"]
    assert [g["labels"]["host"] for g in groups] == ["gone-01", "infer-01"]
    assert jobs["node_exporter"]["hosts_without_contract"] == ["gone-01"]
    # infer-01's own entry comes from its contract, not twice.
    assert sum(g["labels"]["host"] == "infer-01" for g in groups) == 1


def test_endpoint_without_port_is_named():
    bad = {"h": contract("10.0.0.1", {"broken": {"address": "10.0.0.1"}})}
    with pytest.raises(AnsibleFilterError, match="h: metrics endpoint broken has no port"):
        scrape_targets(bad, ["h"])
