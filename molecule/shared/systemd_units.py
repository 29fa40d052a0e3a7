"""Shared testinfra check: every systemd unit file and drop-in that the roles wrote parses cleanly.

systemd ignores an unknown key or section at run time with one journal line ("Unknown key
'StartLimitIntervalSec' in section [Service], ignoring"), so a misplaced setting is silently not in
force. ``systemd-analyze verify`` names those lines; this check fails on any of them in a file the
roles manage (the ``ansible_managed`` header marks them). Scenarios import the test function.
"""

from __future__ import annotations

import posixpath
import re
import shlex

MARKER = "Ansible managed"
UNIT_DIR = "/etc/systemd/system"
# What systemd-analyze prints for a setting it will not apply.
IGNORED = re.compile(r"Unknown (key|section|lvalue)|[Ii]gnoring\.?$")


def managed_unit_files(host):
    out = host.run(
        "grep -rlIs -e %s %s --include='*.service' --include='*.timer' --include='*.socket' --include='*.conf'",
        MARKER,
        UNIT_DIR,
    ).stdout
    return sorted(line for line in out.splitlines() if line)


def unit_name(path):
    """The unit a file configures; a template (``name@.service``) is checked through an instance."""
    parent = posixpath.basename(posixpath.dirname(path))
    name = parent[: -len(".d")] if parent.endswith(".d") else posixpath.basename(path)
    return name.replace("@.", "@verify.")


def test_managed_units_have_no_ignored_settings(host):
    files = managed_unit_files(host)
    assert files, f"no unit file under {UNIT_DIR} carries the '{MARKER}' header: the roles' units were not found"
    units = sorted({unit_name(f) for f in files})
    result = host.run("systemd-analyze verify --man=no " + " ".join(shlex.quote(u) for u in units))
    ignored = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if IGNORED.search(line) and line.split(":", 1)[0] in files
    ]
    assert not ignored, "systemd ignores these settings (wrong section or unknown key):\n" + "\n".join(ignored)
