#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: host_contract
short_description: Publish a role's section of the host contract (a JSON local fact)
version_added: 0.2.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
description:
  - The host contract is one JSON local fact per host, O(path) (default C(/etc/ansible/facts.d/sovereign.fact)),
    read back as C(ansible_local.sovereign). The roles that create paths, ports and sockets publish them there once;
    the release flow, the modules' C(contract) option, C(sovereign-ops) and the benchmarks read them instead of
    restating them. The schema is in C(docs/architecture.md), section "Host contract".
  - O(data) replaces the whole O(section). O(metrics) replaces the metrics endpoints O(section) published before
    (under the top-level C(metrics) key; each endpoint records its C(published_by) section), leaving other
    sections' endpoints alone. Either may be omitted to leave that part as it is.
  - The file is written atomically (a temporary file in the same directory, fsync, rename, directory fsync),
    mode C(0644), not executable (an executable fact file would be run, not read). Its directory is created when
    missing. The text is stable (sorted keys), so publishing the same data again changes nothing.
  - After it, re-read the facts (M(ansible.builtin.setup) with C(filter=ansible_local)) or use RV(contract).
options:
  section:
    description:
      - The section to publish, usually the role's name (V(runtime), V(traffic_switch), V(release)).
      - A lower-case identifier, not V(version) or V(metrics).
    type: str
    required: true
  data:
    description:
      - The section's whole content (a mapping of JSON values). Omitted, the section's data is left as it is.
    type: dict
  metrics:
    description:
      - Metrics endpoints of O(section), by endpoint name (an identifier, unique on the host). They replace every
        endpoint O(section) published before. Omitted, its endpoints are left as they are; V({}) removes them.
      - Each is a mapping with C(address) (required; where it listens, C(0.0.0.0) for every address),
        C(port) (required), C(path) (default C(/metrics)), C(scheme) (V(http) or V(https), default V(http)),
        C(auth) (whether a scraper needs credentials, default V(false)), C(labels) (a mapping of label names to
        strings, default V({})) and C(job) (the Prometheus job name, default the endpoint name).
    type: dict
  state:
    description:
      - V(absent) removes O(section) and every metrics endpoint it published.
    type: str
    choices: [present, absent]
    default: present
  path:
    description:
      - The fact file. Ansible reads C(/etc/ansible/facts.d/*.fact) by default (C(fact_path)); the name gives the
        C(ansible_local) key.
    type: path
    default: /etc/ansible/facts.d/sovereign.fact
attributes:
  check_mode:
    support: full
    details:
      - In check mode nothing is written; RV(contract) is what the file would hold.
  diff_mode:
    support: full
    details:
      - The diff is the file's text before and after.
seealso:
  - module: ansible.builtin.setup
"""

EXAMPLES = r"""
- name: Publish the traffic switch and its metrics endpoint
  sovereign.mlops.host_contract:
    section: traffic_switch
    data:
      frontend: {address: 0.0.0.0, port: 8000, url: "http://127.0.0.1:8000"}
      map_file: /etc/haproxy/sovereign/live.map
      map_key: live
      admin_socket: /run/haproxy/admin.sock
      health_path: /v2/health/ready
      stats: {address: 127.0.0.1, port: 8404}
    metrics:
      haproxy: {address: 127.0.0.1, port: 8404, path: /metrics}

- name: Re-read the contract
  ansible.builtin.setup:
    filter: ansible_local

- name: Use it
  ansible.builtin.debug:
    msg: "{{ ansible_local.sovereign.traffic_switch.map_file }}"

- name: Publish only a metrics endpoint (no section data)
  sovereign.mlops.host_contract:
    section: common
    metrics:
      node_exporter: {address: 10.0.0.5, port: 9100}
"""

RETURN = r"""
contract:
  description: The whole contract after the change (what the file holds, or would hold in check mode).
  returned: success
  type: dict
  sample:
    version: 1
    traffic_switch: {map_file: /etc/haproxy/sovereign/live.map, map_key: live}
    metrics:
      haproxy:
        {job: haproxy, address: 127.0.0.1, port: 8404, path: /metrics, scheme: http, auth: false, labels: {},
         published_by: traffic_switch}
path:
  description: The fact file.
  returned: success
  type: str
  sample: /etc/ansible/facts.d/sovereign.fact
"""

import os
import stat
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._files import read_text, write_atomic
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import (
    ContractError,
    parse,
    publish,
    render,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            section=dict(type="str", required=True),
            data=dict(type="dict"),
            metrics=dict(type="dict"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            path=dict(type="path", default="/etc/ansible/facts.d/sovereign.fact"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    path = p["path"]
    result = dict(changed=False, path=path, contract={})
    try:
        if os.path.isdir(path):
            raise ContractError(
                f"path {path} is a directory: give the fact file, e.g. {path.rstrip('/')}/sovereign.fact"
            )
        before = read_text(path)
        contract = publish(parse(before, path), p["section"], p["data"], p["metrics"], p["state"])
        after = render(contract)
        result["contract"] = contract
        # A file made executable by hand would be run by setup, not read: rewriting it fixes the mode.
        mode_ok = before is None or stat.S_IMODE(os.stat(path).st_mode) == 0o644
        if before == after and mode_ok:
            module.exit_json(**result)
        result["changed"] = True
        if module._diff:
            result["diff"] = dict(before=before or "", after=after, before_header=path, after_header=path)
        if not module.check_mode:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            # 0644 and not executable: Ansible runs an executable .fact file instead of reading it.
            write_atomic(path, after, mode=0o644)
    except ContractError as exc:
        module.fail_json(msg=str(exc), **result)
    except OSError as exc:
        module.fail_json(
            msg=f"could not write {path} ({exc}); run with become: true, or give a writable path.",
            exception=traceback.format_exc(),
            **result,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
