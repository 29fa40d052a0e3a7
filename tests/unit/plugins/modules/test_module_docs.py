# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Every module's documentation is built on the collection's doc fragments (docs/adr/0801), not pasted.

validate-modules (make sanity) checks the merged documentation against each module's argument spec; this checks
that what is shared is taken from plugins/doc_fragments/, so a new module cannot copy the block again.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[4]
MODULES = sorted((ROOT / "plugins" / "modules").glob("*.py"))
FRAGMENTS = ROOT / "plugins" / "doc_fragments"
ANSIBLE_DOC = shutil.which("ansible-doc", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))

# option -> the fragment that documents it, for every module that has the option
SHARED_OPTIONS = {
    "map_file": "sovereign.mlops._traffic_switch",
    "map_key": "sovereign.mlops._traffic_switch",
    "admin_socket": "sovereign.mlops._traffic_switch.admin_socket",
    "contract": "sovereign.mlops._host_contract",
}


def own_doc(path):
    """The module's DOCUMENTATION as written (before fragments), read without importing the module."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DOCUMENTATION":
            return yaml.safe_load(node.value.value)
    raise AssertionError(f"{path.name} has no DOCUMENTATION")


@functools.cache
def rendered():
    """What ansible-doc shows for every module, fragments merged in (one run; the checkout's collections/ link)."""
    proc = subprocess.run(
        [ANSIBLE_DOC, "-t", "module", "--json", *(f"sovereign.mlops.{p.stem}" for p in MODULES)],
        capture_output=True,
        text=True,
        env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / "collections"), ANSIBLE_NOCOLOR="1"),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def merged_doc(path):
    return rendered()[f"sovereign.mlops.{path.stem}"]["doc"]


pytestmark = pytest.mark.skipif(not ANSIBLE_DOC, reason="ansible-doc is not installed")


def test_there_are_modules():
    assert len(MODULES) >= 5, MODULES
    assert {p.name for p in FRAGMENTS.glob("_*.py")} >= {"_attributes.py", "_host_contract.py", "_traffic_switch.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_attributes_come_from_the_fragment(path):
    doc = own_doc(path)
    assert "sovereign.mlops._attributes" in doc.get("extends_documentation_fragment", []), path.name
    for name in ("check_mode", "diff_mode", "platform"):
        assert "description" not in doc.get("attributes", {}).get(name, {}), f"{path.name}: {name} pasted again"
    assert not any("Runs only on Python 3" in line for line in doc["description"]), "that is the platform attribute"
    merged = merged_doc(path)["attributes"]
    for name in ("check_mode", "diff_mode", "platform"):
        assert merged[name].get("description") and merged[name].get("support"), (path.name, name, merged[name])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_shared_options_come_from_their_fragment(path):
    doc = own_doc(path)
    fragments = doc.get("extends_documentation_fragment", [])
    merged = merged_doc(path)["options"]
    for option, fragment in SHARED_OPTIONS.items():
        if option not in merged:
            continue
        assert fragment in fragments, f"{path.name}: {option} must come from {fragment}"
        # a module may override one key (a default), never redefine the option
        assert "type" not in (doc.get("options") or {}).get(option, {}), f"{path.name}: {option} documented again"
