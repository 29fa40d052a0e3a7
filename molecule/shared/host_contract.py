"""Shared testinfra helper: the host contract fact as the roles wrote it (docs/architecture.md)."""

from __future__ import annotations

import json

CONTRACT = "/etc/ansible/facts.d/sovereign.fact"


def read_contract(host):
    f = host.file(CONTRACT)
    # Ansible's setup reads a non-executable .fact file as JSON (an executable one it would run).
    assert (f.user, f.group, f.mode) == ("root", "root", 0o644)
    return json.loads(f.content_string)
