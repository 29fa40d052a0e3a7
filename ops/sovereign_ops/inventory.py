"""Ansible YAML inventories, read without Ansible: hosts, groups (children), vars and connection settings."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import yaml


class InventoryError(Exception):
    pass


@dataclasses.dataclass
class Host:
    name: str
    vars: dict
    groups: set

    @property
    def address(self):
        return str(self.vars.get("ansible_host") or self.name)

    @property
    def port(self):
        return int(self.vars.get("ansible_port") or self.vars.get("ansible_ssh_port") or 22)

    @property
    def user(self):
        return self.vars.get("ansible_user") or self.vars.get("ansible_ssh_user")

    @property
    def key_file(self):
        return self.vars.get("ansible_ssh_private_key_file") or self.vars.get("ansible_private_key_file")

    @property
    def become(self):
        value = self.vars.get("ansible_become", False)
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")

    @property
    def known_hosts(self):
        """UserKnownHostsFile=... from ansible_ssh_common_args / ansible_ssh_extra_args, else None."""
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            words = shlex.split(str(self.vars.get(key) or ""))
            for i, word in enumerate(words):
                option = word
                if word == "-o" and i + 1 < len(words):
                    option = words[i + 1]
                elif word.startswith("-o"):
                    option = word[2:]
                if option.lower().startswith("userknownhostsfile="):
                    return option.split("=", 1)[1]
        return None

    def check_templates(self):
        """Raise when a connection setting is a Jinja template (this tool does not evaluate them)."""
        for key in (
            "ansible_host",
            "ansible_port",
            "ansible_user",
            "ansible_ssh_private_key_file",
            "ansible_ssh_common_args",
        ):
            value = self.vars.get(key)
            if isinstance(value, str) and "{{" in value:
                raise InventoryError(
                    f"{self.name}: {key} is a template ({value!r}); sovereign-ops reads inventories without Ansible. "
                    "Give a literal value (the lab's generated inventory has literal values)."
                )


def _load_yaml(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def _vars_dir(directory, name):
    """Vars of group/host NAME from DIRECTORY/NAME.yml|yaml or DIRECTORY/NAME/*.yml (merged in name order)."""
    merged = {}
    for ext in ("", ".yml", ".yaml"):
        candidate = Path(directory) / f"{name}{ext}"
        if candidate.is_file():
            merged.update(_load_yaml(candidate))
        elif ext == "" and candidate.is_dir():
            for child in sorted(candidate.iterdir()):
                if child.suffix in (".yml", ".yaml"):
                    merged.update(_load_yaml(child))
    return merged


def parse(data):
    """(hosts {name: vars}, groups {name: {hosts, children, vars}}) of one inventory document."""
    groups = {}
    host_vars = {}

    def walk(name, body):
        body = body or {}
        group = groups.setdefault(name, dict(hosts=set(), children=set(), vars={}))
        group["vars"].update(body.get("vars") or {})
        for host, hvars in (body.get("hosts") or {}).items():
            group["hosts"].add(str(host))
            host_vars.setdefault(str(host), {}).update(hvars or {})
        for child, child_body in (body.get("children") or {}).items():
            group["children"].add(child)
            walk(child, child_body)

    if not isinstance(data, dict):
        raise InventoryError("an inventory must be a YAML mapping of groups (e.g. 'all:')")
    for name, body in data.items():
        walk(name, body)
    groups.setdefault("all", dict(hosts=set(), children=set(), vars={}))
    groups["all"]["children"] |= {g for g in groups if g != "all"}
    return host_vars, groups


def _group_hosts(groups, name, seen=None):
    seen = set() if seen is None else seen
    if name in seen or name not in groups:
        return set()
    seen.add(name)
    out = set(groups[name]["hosts"])
    for child in groups[name]["children"]:
        out |= _group_hosts(groups, child, seen)
    return out


def _depth(groups, name):
    """Distance from 'all' (parents' vars apply before children's, as in Ansible)."""
    parents = [g for g, body in groups.items() if name in body["children"]]
    return 0 if not parents else 1 + max(_depth(groups, p) for p in parents)


def load(path):
    """Every host of the inventory at PATH (a YAML file, or a directory of them) with its merged vars."""
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yml", ".yaml") and p.is_file()) if path.is_dir() else [path]
    )
    if not files:
        raise InventoryError(f"no inventory file (*.yml) in {path}")
    host_vars, groups = {}, {}
    for file in files:
        hv, gr = parse(_load_yaml(file))
        for host, values in hv.items():
            host_vars.setdefault(host, {}).update(values)
        for name, body in gr.items():
            group = groups.setdefault(name, dict(hosts=set(), children=set(), vars={}))
            group["hosts"] |= body["hosts"]
            group["children"] |= body["children"] - {name}
            group["vars"].update(body["vars"])
    base = path if path.is_dir() else path.parent
    hosts = {}
    ordered_groups = sorted(groups, key=lambda g: (_depth(groups, g), g))
    for host in sorted(host_vars):
        member = {g for g in groups if host in _group_hosts(groups, g)}
        merged = {}
        for group in ordered_groups:
            if group in member:
                merged.update(groups[group]["vars"])
                merged.update(_vars_dir(base / "group_vars", group))
        merged.update(host_vars[host])
        merged.update(_vars_dir(base / "host_vars", host))
        hosts[host] = Host(name=host, vars=merged, groups=member)
    return hosts


def select(hosts, group="inference", limit=None):
    """Hosts of GROUP (inventory order by name), narrowed by LIMIT (comma-separated host names or groups)."""
    chosen = [h for h in hosts.values() if group in h.groups or group == "all"]
    if not chosen:
        raise InventoryError(f"no host in group {group!r}")
    if limit:
        wanted = {w.strip() for w in limit.split(",") if w.strip()}
        chosen = [h for h in chosen if h.name in wanted or h.groups & wanted]
        if not chosen:
            raise InventoryError(f"--limit {limit!r} matches no host of group {group!r}")
    return sorted(chosen, key=lambda h: h.name)


def default_inventory():
    return os.environ.get("SOVEREIGN_OPS_INVENTORY") or os.environ.get("ANSIBLE_INVENTORY") or "inventories/lab"
