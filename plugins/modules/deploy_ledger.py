#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy_ledger
short_description: Record a release operation in a host's ledger and refresh its deploy metrics
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._traffic_switch
  - sovereign.mlops._host_contract
description:
  - Appends one record (a JSON object on one line) to the host's deployment ledger, under an C(flock), fsync'd.
    The playbooks record every deploy and rollback, failed ones included (C(result=failed) and a C(reason)).
  - Then rewrites the node_exporter textfile O(metrics_path) atomically (C(prometheus_client.write_to_textfile),
    a temporary file and a rename) from the host's actual state, so the metrics never drift from what the host
    serves. C(sovereign_deploy_live_color{color}) from the traffic switch's map file,
    C(sovereign_deploy_model_info{color,model,version}) from each color's C(<color>.model.env),
    C(sovereign_deploy_model_data_info{color,data_rev,data_md5}) for each color whose model's data version the
    ledger knows (see RV(models)),
    C(sovereign_deploy_last_timestamp_seconds{action}), C(sovereign_deploy_last_success{action}) and
    C(sovereign_deploy_operations{action,result}) from the ledger.
  - Without O(record) it only reads. It returns the last O(tail) records and, with O(refresh_metrics=true),
    rewrites the metrics.
  - Needs the C(prometheus_client) Python package on the host (Debian C(python3-prometheus-client)) whenever it
    writes metrics.
options:
  path:
    description:
      - The ledger (JSON lines). Its directory is created when missing.
      - Default from O(contract) (C(release.ledger)), else C(/var/lib/sovereign/deployments.jsonl).
    type: path
  record:
    description:
      - The record to append. Keys are free; the playbooks write C(action), C(who), C(time), C(host), C(color),
        C(previous_color), C(model_name), C(model_version), C(model_uri), C(model_sha256), C(result), C(reason),
        and the lineage of the model C(data_rev), C(data_md5) (the DVC data version that trained it, from the
        registry version's C(data.rev) and C(data.md5) tags, else its run's) and C(run_id) (the MLflow run), V("")
        when unknown.
      - Lineage values that are not strings (V(null), numbers) are stored as strings, V(null) as V("").
      - C(time) (now, ISO 8601 UTC) and C(action) (V(deploy)) are added when missing.
    type: dict
  tail:
    description:
      - How many of the newest records to return in RV(records) (after appending).
    type: int
    default: 0
  refresh_metrics:
    description:
      - Rewrite O(metrics_path) even when no O(record) is given.
    type: bool
    default: false
  metrics_path:
    description:
      - The node_exporter textfile to rewrite. V("") writes none.
      - Default from O(contract) (C(release.metrics_file)), else
        C(/var/lib/prometheus/node-exporter/sovereign_deploy.prom).
    type: path
  config_dir:
    description:
      - Where the runtime's C(<color>.model.env) files are (C(inference_runtime_config_dir)).
      - Default from O(contract) (C(runtime.config_dir)), else C(/etc/sovereign/runtime). With a contract, each
        color's model file is its C(runtime.colors.<color>.model_env) unless O(config_dir) is given.
    type: path
attributes:
  check_mode:
    support: full
    details:
      - In check mode nothing is written; RV(line) shows the record that would be appended.
  diff_mode:
    support: none
seealso:
  - module: sovereign.mlops.deploy_lock
"""

EXAMPLES = r"""
- name: Record a failed deploy
  sovereign.mlops.deploy_ledger:
    record:
      action: deploy
      who: alice@laptop
      host: "{{ inventory_hostname }}"
      color: green
      previous_color: blue
      model_name: fraud
      model_version: "7"
      model_uri: models:/fraud/7
      data_rev: 528ab3d4e1c2f0a9b8c7d6e5f4a3b2c1d0e9f8a7
      data_md5: 3d7fd59556f8375d55d9d9d60743a422.dir
      run_id: 4ec69dfa0b1c4d2e8f3a5b6c7d8e9f01
      result: failed
      reason: "smoke test: latency_p99 81 ms > 50 ms"

- name: The last deploy records of this host
  sovereign.mlops.deploy_ledger:
    tail: 5
  register: ledger

- name: The data version that trained the blue color's model
  ansible.builtin.debug:
    msg: "{{ ledger.models.blue.data_rev | default('unknown', true) }}"
"""

RETURN = r"""
line:
  description: The line appended (or that would be, in check mode); V(null) without O(record).
  returned: always
  type: str
records:
  description: The O(tail) newest records, oldest first.
  returned: always
  type: list
  elements: dict
live_color:
  description: The live color read from O(map_file) (V(null) when the file or entry is missing).
  returned: always
  type: str
models:
  description:
    - Each color's configured model C({uri, name, version, golden_file, golden, data_rev, data_md5, run_id}),
      V(null) for a color without one.
    - C(data_rev), C(data_md5) and C(run_id) come from the newest ledger record of that very model (same
      C(model_uri) and C(model_version)) that carries them, V("") when none does. The rollback records them.
    - C(golden_file) is the golden file the runtime uses for a local model (C(SOVEREIGN_RUNTIME_GOLDEN_FILE), else
      C(<file>.golden.json), C(<dir>/golden.json) or C(<dir>/extra_files/golden.json)), C(golden) its content
      (V(null) for registry models, whose golden file is inside the artifact). The rollback's smoke test uses it.
  returned: always
  type: dict
metrics_written:
  description: Whether O(metrics_path) was rewritten.
  returned: always
  type: bool
"""

import importlib.util
import json
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.sovereign.mlops.plugins.module_utils._deploy_metrics import metrics_registry, write_metrics
from ansible_collections.sovereign.mlops.plugins.module_utils._files import map_value, read_text
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import get, resolve
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import (
    LINEAGE_FIELDS,
    append_record,
    color_models,
    iso_from_epoch,
    model_lineage,
    read_golden,
    read_ledger,
)

# Options that default from the host contract (docs/architecture.md, "Host contract"), then to these values.
CONTRACT_DEFAULTS = dict(
    path=(("release", "ledger"), "/var/lib/sovereign/deployments.jsonl"),
    metrics_path=(("release", "metrics_file"), "/var/lib/prometheus/node-exporter/sovereign_deploy.prom"),
    config_dir=(("runtime", "config_dir"), "/etc/sovereign/runtime"),
    map_file=(("traffic_switch", "map_file"), "/etc/haproxy/sovereign/live.map"),
    map_key=(("traffic_switch", "map_key"), "live"),
)

# _deploy_metrics imports prometheus_client lazily, only to write metrics; here we only look for it.
HAS_PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path"),
            record=dict(type="dict"),
            tail=dict(type="int", default=0),
            refresh_metrics=dict(type="bool", default=False),
            metrics_path=dict(type="path"),
            config_dir=dict(type="path"),
            map_file=dict(type="path"),
            map_key=dict(type="str", no_log=False),
            contract=dict(type="dict"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    source = resolve(p, p["contract"], CONTRACT_DEFAULTS)
    # The contract names each color's model file; an explicit config_dir means the caller's layout instead.
    model_envs = None
    if source["config_dir"] == "contract":
        colors = get(p["contract"], "runtime", "colors") or {}
        model_envs = {c: spec.get("model_env") for c, spec in colors.items() if isinstance(spec, dict)}
    if p["tail"] < 0:
        module.fail_json(msg="tail must be >= 0, got {}".format(p["tail"]))
    record = p["record"]
    write_prom = bool(p["metrics_path"]) and (record is not None or p["refresh_metrics"])
    if write_prom and not HAS_PROMETHEUS:
        module.fail_json(
            msg=missing_required_lib("prometheus_client (Debian: python3-prometheus-client)")
            + " It is needed to write "
            + p["metrics_path"],
        )

    result = dict(changed=False, line=None, records=[], live_color=None, models={}, metrics_written=False)
    try:
        if record is not None:
            record = dict(record)
            record.setdefault("action", "deploy")
            for key in LINEAGE_FIELDS:
                if key in record:
                    record[key] = "" if record[key] is None else str(record[key])
            if not record.get("time"):
                record["time"] = iso_from_epoch(time.time())
            result["changed"] = True
            if module.check_mode:
                result["line"] = json.dumps(record, sort_keys=True, separators=(",", ":"))
            else:
                result["line"] = append_record(p["path"], record)

        records = read_ledger(p["path"])
        if record is not None and module.check_mode:
            records.append(record)
        live = map_value(read_text(p["map_file"]), p["map_key"])
        models = color_models(p["config_dir"], paths=model_envs)
        for model in models.values():
            if model is not None:
                model["golden"] = read_golden(model["golden_file"])
                model.update(model_lineage(records, model))
        result.update(live_color=live, models=models, records=records[-p["tail"] :] if p["tail"] else [])

        if write_prom:
            result["changed"] = True
            if not module.check_mode:
                write_metrics(p["metrics_path"], metrics_registry(live, models, records))
                result["metrics_written"] = True
    except OSError as exc:
        module.fail_json(msg=f"{exc.__class__.__name__}: {exc}", exception=traceback.format_exc(), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
