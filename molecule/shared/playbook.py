"""Run one of the collection's playbooks from a molecule test, as an operator would: a real ``ansible-playbook``
process against molecule's inventory (``MOLECULE_INVENTORY_FILE``, which ``molecule verify`` sets).

Used by molecule/release (``sys.path.insert`` of molecule/shared, as for host_contract.py): :func:`play` runs a
playbook to its end; :func:`command` is its command line, for a test that starts the process itself (to kill it
mid-way).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

PROJECT = pathlib.Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", pathlib.Path(__file__).resolve().parents[2]))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


def command(name: str, extra: dict | None = None, check: bool = False) -> list[str]:
    """The ``ansible-playbook`` command line of ``playbooks/NAME`` with ``extra`` as one JSON ``-e``."""
    assert INVENTORY, "MOLECULE_INVENTORY_FILE is not set (run the tests through molecule verify)"
    cmd = [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(PROJECT / "playbooks" / name)] + (["--check"] if check else [])
    if extra:
        cmd += ["-e", json.dumps(extra)]
    return cmd


def play(
    name: str, extra: dict | None = None, timeout: float = 600, check: bool = False, tail: int = 6000
) -> tuple[int, str, float]:
    """Run ``playbooks/NAME``; returns (rc, its output with whitespace collapsed, seconds).

    The output's last ``tail`` characters are printed as they are (pytest shows them on a failure). The returned
    text has every run of whitespace (and each escaped ``\\n``) made one space: the yaml callback wraps long
    messages, so a test compares with collapsed whitespace."""
    cmd = command(name, extra, check)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    print(f"--- {' '.join(cmd)} -> rc {proc.returncode} in {seconds:.1f}s\n{out[-tail:]}")
    return proc.returncode, " ".join(out.replace("\\n", " ").split()), seconds
