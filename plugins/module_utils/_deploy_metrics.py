# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The ``sovereign_deploy_*`` node_exporter textfile metrics of one inference host.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

They are rebuilt from the host's actual state (the live color from the map file, each color's model env file) and
its ledger on every write, so they never drift from what the host serves. ``prometheus_client`` is imported
lazily: only hosts that write metrics need it.
"""

from __future__ import annotations

import os

from ansible_collections.sovereign.mlops.plugins.module_utils._files import write_atomic
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import COLORS, epoch_from_iso, model_lineage


def metrics_registry(live_color, models, records, colors=COLORS):
    """A prometheus_client registry with the sovereign_deploy_* families (imported lazily: hosts need it)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    live = Gauge(
        "sovereign_deploy_live_color", "1 for the color the traffic switch routes to", ["color"], registry=registry
    )
    info = Gauge(
        "sovereign_deploy_model_info",
        "The model each color is configured to serve (value 1)",
        ["color", "model", "version"],
        registry=registry,
    )
    last_time = Gauge(
        "sovereign_deploy_last_timestamp_seconds",
        "When the last release operation on this host ended, by action",
        ["action"],
        registry=registry,
    )
    last_ok = Gauge(
        "sovereign_deploy_last_success",
        "1 when the last release operation of this action succeeded, 0 when it failed",
        ["action"],
        registry=registry,
    )
    switched_back = Gauge(
        "sovereign_deploy_last_switched_back",
        "1 when the last release operation of this action failed after its switch and the play switched traffic back"
        " itself (an automatic rollback), else 0",
        ["action"],
        registry=registry,
    )
    # A separate family, not labels on model_info: its series stay as they were, and this one has at most one
    # series per color (the data version changes only with the model).
    data_info = Gauge(
        "sovereign_deploy_model_data_info",
        "The data version (DVC data.rev, data.md5) that trained each color's model, from the ledger (value 1)",
        ["color", "data_rev", "data_md5"],
        registry=registry,
    )
    total = Gauge(
        "sovereign_deploy_operations",
        "Release operations recorded in this host's ledger, by action and result",
        ["action", "result"],
        registry=registry,
    )
    for color in colors:
        live.labels(color=color).set(1 if color == live_color else 0)
        model = models.get(color)
        if model:
            info.labels(color=color, model=model["name"] or "", version=model["version"] or "").set(1)
            lineage = model_lineage(records, model)
            if lineage["data_rev"] or lineage["data_md5"]:
                data_info.labels(color=color, data_rev=lineage["data_rev"], data_md5=lineage["data_md5"]).set(1)
    counts = {}
    for record in records:
        action = str(record.get("action") or "deploy")
        result = str(record.get("result") or "unknown")
        counts[(action, result)] = counts.get((action, result), 0) + 1
    for (action, result), count in sorted(counts.items()):
        total.labels(action=action, result=result).set(count)
    for action in sorted({a for a, _dummy in counts}):
        record = next((r for r in reversed(records) if str(r.get("action") or "deploy") == action), None)
        epoch = epoch_from_iso(record.get("time")) if record else None
        if epoch is not None:
            last_time.labels(action=action).set(epoch)
        last_ok.labels(action=action).set(1 if record and record.get("result") == "success" else 0)
        switched_back.labels(action=action).set(1 if record and record.get("switched_back") is True else 0)
    return registry


def write_metrics(path, registry, mode=0o644):
    """Write the registry in the text exposition format to ``path`` atomically (node_exporter's textfile
    collector must never read half a file); its directory is created when missing."""
    from prometheus_client import generate_latest

    os.makedirs(os.path.dirname(os.path.abspath(path)), 0o755, exist_ok=True)
    write_atomic(path, generate_latest(registry), mode=mode)
