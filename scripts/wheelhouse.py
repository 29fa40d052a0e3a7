"""Build the controller-side wheelhouse that hosts install from, offline.

Each requirements/hosts-<set>.in becomes .cache/wheelhouse/<set>/ (binary wheels pinned by
requirements/constraints.txt), so a role copies only what its hosts need; the runtime's own wheel
is built from runtime/ into the `runtime` set. .cache/wheelhouse/ itself holds every wheel of every
set (hard links) for tools that want one flat directory. Skips all work when its inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
RUNTIME = ROOT / "runtime"
# Pure-Python packages a host set needs that are published only as sdists (`pip download
# --only-binary` rejects them): built into wheels here first, where pip download finds them.
SDIST_ONLY = ("antlr4-python3-runtime",)  # hydra-core's pin, for dvc (hosts-dvc.in)


def requirement_sets() -> dict[str, Path]:
    return {p.stem.removeprefix("hosts-"): p for p in sorted((ROOT / "requirements").glob("hosts-*.in"))}


def inputs_digest() -> str:
    digest = hashlib.sha256()
    sources = sorted(RUNTIME.rglob("*")) if RUNTIME.is_dir() else []
    for path in [Path(__file__), CONSTRAINTS, *requirement_sets().values(), *sources]:
        skip = any(part in ("__pycache__", "build", "dist") or part.endswith(".egg-info") for part in path.parts)
        if path.is_file() and not skip:
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def pip(*args: str) -> None:
    # A fixed SOURCE_DATE_EPOCH makes the runtime's wheel byte-identical for identical sources, so
    # hosts (which compare its checksum) reinstall and restart only when the runtime really changed.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def main() -> int:
    stamp = WHEELHOUSE / ".stamp"
    digest = inputs_digest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        print(f"wheelhouse {WHEELHOUSE.relative_to(ROOT)}: up to date")
        return 0
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for old in WHEELHOUSE.glob("*.whl"):
        old.unlink()
    built = WHEELHOUSE / ".sdist-wheels"
    built.mkdir(exist_ok=True)
    for old in built.glob("*.whl"):
        old.unlink()
    pip("wheel", "-q", "--no-deps", "-w", str(built), "-c", str(CONSTRAINTS), *SDIST_ONLY)
    for name, requirements in requirement_sets().items():
        target = WHEELHOUSE / name
        if target.exists():
            for old in target.glob("*.whl"):
                old.unlink()
        pip(
            "download",
            "-q",
            "--only-binary=:all:",
            "--find-links",
            str(built),
            "-d",
            str(target),
            "-c",
            str(CONSTRAINTS),
            "-r",
            str(requirements),
        )
        if name == "runtime" and (RUNTIME / "pyproject.toml").exists():
            pip("wheel", "-q", "--no-deps", "-w", str(target), str(RUNTIME))
        for wheel in target.glob("*.whl"):
            flat = WHEELHOUSE / wheel.name
            if not flat.exists():
                os.link(wheel, flat)
    stamp.write_text(digest + "\n")
    summary = ", ".join(f"{name}: {len(list((WHEELHOUSE / name).glob('*.whl')))}" for name in requirement_sets())
    print(f"wheelhouse {WHEELHOUSE.relative_to(ROOT)}: {summary} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
