"""Build the controller-side wheelhouse that hosts install from, offline.

Downloads binary wheels for requirements/hosts.in (pinned by requirements/constraints.txt) and
builds the runtime's own wheel from runtime/. Skips all work when its inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
INPUTS = [ROOT / "requirements" / "hosts.in", ROOT / "requirements" / "constraints.txt"]


def inputs_digest() -> str:
    digest = hashlib.sha256()
    runtime = ROOT / "runtime"
    sources = sorted(runtime.rglob("*")) if runtime.is_dir() else []
    for path in INPUTS + sources:
        skip = "__pycache__" in path.parts or any(part.endswith(".egg-info") for part in path.parts)
        if path.is_file() and not skip:
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> int:
    stamp = WHEELHOUSE / ".stamp"
    digest = inputs_digest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        print(f"wheelhouse {WHEELHOUSE.relative_to(ROOT)}: up to date")
        return 0
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    pip("download", "-q", "--only-binary=:all:", "-d", str(WHEELHOUSE), "-c", str(INPUTS[1]), "-r", str(INPUTS[0]))
    if (ROOT / "runtime" / "pyproject.toml").exists():
        pip("wheel", "-q", "--no-deps", "-w", str(WHEELHOUSE), str(ROOT / "runtime"))
    stamp.write_text(digest + "\n")
    count = len(list(WHEELHOUSE.glob("*.whl")))
    print(f"wheelhouse {WHEELHOUSE.relative_to(ROOT)}: {count} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
