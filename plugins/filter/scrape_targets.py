# Copyright: sovereign.mlops contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prometheus file_sd target groups from every host's contract (docs/architecture.md, "Host contract")."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import url_host

DOCUMENTATION = r"""
name: scrape_targets
author: sovereign.mlops maintainers
version_added: 0.1.0
short_description: Prometheus file_sd target groups from the hosts' contracts
description:
  - Reads C(ansible_local.sovereign.metrics) of every host in O(hosts) and returns one list of C(file_sd)
    target groups per Prometheus job.
  - Each group has the label C(host) (the inventory name) plus the endpoint's own C(labels) (C(color) for the
    runtimes), and C(__metrics_path__) and C(__scheme__) from the endpoint, so one job may mix paths.
  - An endpoint bound to a wildcard (C(0.0.0.0), C(::)) is scraped at the host's C(common.internal_address),
    else its C(ansible_host), else its inventory name.
  - A host without a contract in this run (unreachable, facts not gathered) keeps the target groups it had in
    O(previous), so it shows as down instead of disappearing.
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  hosts:
    description: The inventory names to read.
    type: list
    elements: str
    required: true
  previous:
    description: The target groups written before, by job (the current file_sd files).
    type: dict
    default: {}
"""

EXAMPLES = r"""
- name: Targets by job
  ansible.builtin.set_fact:
    targets: "{{ hostvars | sovereign.mlops.scrape_targets(groups['all']) }}"
"""

RETURN = r"""
_value:
  description:
    - "C({job: {targets: [target groups], auth: bool, hosts_without_contract: [names]}}); C(auth) is true when
      any endpoint of the job needs credentials."
  type: dict
"""


WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def _get(mapping, *keys):
    for key in keys:
        try:
            mapping = mapping[key]
        except (KeyError, TypeError, IndexError):
            return None
        if mapping is None:
            return None
    return mapping


def _address(hostvars, host, address):
    if str(address) in WILDCARDS:
        address = (
            _get(hostvars, host, "ansible_local", "sovereign", "common", "internal_address")
            or _get(hostvars, host, "ansible_host")
            or host
        )
    return url_host(address)


def scrape_targets(hostvars, hosts, previous=None):
    previous = previous or {}
    jobs = {}
    missing = []
    for host in hosts:
        contract = _get(hostvars, host, "ansible_local", "sovereign")
        if not isinstance(contract, dict):
            missing.append(str(host))
            continue
        endpoints = contract.get("metrics") or {}
        if not isinstance(endpoints, dict):
            raise AnsibleFilterError(f"{host}: ansible_local.sovereign.metrics is not a mapping")
        for name in sorted(endpoints):
            spec = endpoints[name] or {}
            if "port" not in spec:
                raise AnsibleFilterError(f"{host}: metrics endpoint {name} has no port")
            job = str(spec.get("job") or name)
            labels = {str(k): str(v) for k, v in sorted((spec.get("labels") or {}).items())}
            labels.update(
                host=str(host),
                __metrics_path__=str(spec.get("path") or "/metrics"),
                __scheme__=str(spec.get("scheme") or "http"),
            )
            entry = jobs.setdefault(job, {"targets": [], "auth": False, "hosts_without_contract": []})
            entry["auth"] = entry["auth"] or bool(spec.get("auth"))
            target = f"{_address(hostvars, host, spec.get('address', ''))}:{int(spec['port'])}"
            entry["targets"].append({"targets": [target], "labels": labels})
    for host in missing:
        for job, groups in sorted(previous.items()):
            kept = [g for g in groups or [] if (g.get("labels") or {}).get("host") == host]
            if kept:
                entry = jobs.setdefault(job, {"targets": [], "auth": False, "hosts_without_contract": []})
                entry["targets"].extend(kept)
                entry["hosts_without_contract"].append(host)
    for entry in jobs.values():
        entry["targets"].sort(key=lambda g: (g["labels"].get("host", ""), g["targets"]))
    return jobs


class FilterModule:
    def filters(self):
        return {"scrape_targets": scrape_targets}
