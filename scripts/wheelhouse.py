"""Build the controller-side wheelhouse that hosts install from, offline.

Each requirements/hosts-<set>.in becomes .cache/wheelhouse/<set>/ (binary wheels pinned by
requirements/constraints.txt), so a role copies only what its hosts need; the runtime's own wheel
is built from runtime/ into the `runtime` set. .cache/wheelhouse/ itself holds every wheel of every
set (hard links) for tools that want one flat directory. Skips all work when its inputs are unchanged.
Every wheel it downloads is kept in a machine-wide cache too (SOVEREIGN_WHEEL_CACHE, default
~/.cache/sovereign/wheels): a set whose pins are all there is taken from it offline (a fresh clone: 30 s, not minutes).

GPU hosts: SOVEREIGN_TORCH_VARIANTS="cu126" (space or comma separated) also downloads that CUDA build of the
pinned torch with its dependencies (the nvidia-* CUDA wheels, several GB) from the PyTorch index
(SOVEREIGN_TORCH_INDEX_URL, default https://download.pytorch.org/whl) into .cache/wheelhouse/torch-<variant>/,
which inference_runtime (inference_runtime_torch_variant) and nvidia_gpu (the health gate) install from. Not
in the flat directory: its torch would shadow the CPU build there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
RUNTIME = ROOT / "runtime"
# Pure-Python packages a host set needs that are published only as sdists (`pip download
# --only-binary` rejects them): built into wheels here first, where pip download finds them.
SDIST_ONLY = ("antlr4-python3-runtime",)  # hydra-core's pin, for dvc (hosts-dvc.in)


# Every wheel downloaded is also kept here (hard links, else copies), per machine, not per checkout: a fresh clone
# (every CI run) takes its sets from it without the network, and downloads only when a pin is not there yet.
WHEEL_CACHE = Path(
    os.environ.get("SOVEREIGN_WHEEL_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sovereign" / "wheels"
)

TORCH_INDEX_URL = os.environ.get("SOVEREIGN_TORCH_INDEX_URL", "https://download.pytorch.org/whl").rstrip("/")


def torch_variants() -> list[str]:
    """The CUDA torch builds asked for (SOVEREIGN_TORCH_VARIANTS), each a PyTorch index name cu12x."""
    variants = os.environ.get("SOVEREIGN_TORCH_VARIANTS", "").replace(",", " ").split()
    bad = [v for v in variants if not re.fullmatch(r"cu12[0-9]+", v)]
    if bad:
        sys.exit(f"SOVEREIGN_TORCH_VARIANTS: {bad} are not CUDA 12 builds (cu121, cu124, cu126, ...)")
    return variants


def torch_pin() -> str:
    """The pinned torch version without its local label (2.13.0+cpu -> 2.13.0)."""
    for line in CONSTRAINTS.read_text().splitlines():
        if line.lower().startswith("torch=="):
            return line.split("==", 1)[1].split("+", 1)[0].strip()
    sys.exit(f"{CONSTRAINTS}: no torch== pin")


def torch_download_args(variant: str, target: Path, constraints: Path) -> list[str]:
    """pip arguments downloading torch==<pin>+<variant> and its dependencies, pinned like every other set."""
    return [
        "download", "-q", "--only-binary=:all:", "-d", str(target), "--index-url", f"{TORCH_INDEX_URL}/{variant}",
        "-c", str(constraints), f"torch=={torch_pin()}+{variant}",
    ]  # fmt: skip


def download_torch_variants() -> None:
    for variant in torch_variants():
        target = WHEELHOUSE / f"torch-{variant}"
        target.mkdir(exist_ok=True)
        for old in target.glob("*.whl"):
            old.unlink()
        # The constraints without torch's own line (its +cpu label would refuse the CUDA build).
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
            handle.write("".join(line + "\n" for line in CONSTRAINTS.read_text().splitlines()
                                 if not line.lower().startswith("torch==")))  # fmt: skip
        try:
            pip(*torch_download_args(variant, target, Path(handle.name)))
        finally:
            os.unlink(handle.name)
        print(f"wheelhouse {target.relative_to(ROOT)}: {len(list(target.glob('*.whl')))} wheels")


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
    digest.update(" ".join(torch_variants()).encode())
    return digest.hexdigest()[:16]


def pip(*args: str, quiet_failure: bool = False) -> None:
    # A fixed SOURCE_DATE_EPOCH makes the runtime's wheel byte-identical for identical sources, so
    # hosts (which compare its checksum) reinstall and restart only when the runtime really changed.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    # quiet_failure: a try whose failure is expected and handled (the cache lacks a pin): no pip error on screen.
    subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, env=env, stderr=subprocess.DEVNULL if quiet_failure else None
    )


def build_sdist_only(built: Path) -> None:
    """SDIST_ONLY's wheels into ``built``: the ones built before, from the machine's wheel cache, else built now."""
    args = ["wheel", "-q", "--no-deps", "-w", str(built), "-c", str(CONSTRAINTS)]
    if WHEEL_CACHE.is_dir():
        try:
            pip(*args, "--no-index", "--find-links", str(WHEEL_CACHE), *SDIST_ONLY, quiet_failure=True)
            return
        except subprocess.CalledProcessError:
            pass
    pip(*args, *SDIST_ONLY)


def download_set(requirements: Path, target: Path, built: Path) -> None:
    """One set's wheels into ``target``: from the machine's wheel cache alone when it holds every pin, else from
    the index (every wheel then joins the cache)."""
    args = ["download", "-q", "--only-binary=:all:", "--find-links", str(built), "-d", str(target)]
    args += ["-c", str(CONSTRAINTS), "-r", str(requirements)]
    if WHEEL_CACHE.is_dir():
        try:
            pip(*args[:2], "--no-index", "--find-links", str(WHEEL_CACHE), *args[2:], quiet_failure=True)
            return
        except subprocess.CalledProcessError:
            for partial in target.glob("*.whl"):
                partial.unlink()
            print(f"wheelhouse {target.name}: not every pin is in {WHEEL_CACHE}; downloading")
    pip(*args)
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    for wheel in target.glob("*.whl"):
        cached = WHEEL_CACHE / wheel.name
        if not cached.exists():
            try:
                os.link(wheel, cached)
            except OSError:  # another file system
                shutil.copy2(wheel, cached)


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
    build_sdist_only(built)
    for name, requirements in requirement_sets().items():
        target = WHEELHOUSE / name
        if target.exists():
            for old in target.glob("*.whl"):
                old.unlink()
        download_set(requirements, target, built)
        if name == "runtime" and (RUNTIME / "pyproject.toml").exists():
            pip("wheel", "-q", "--no-deps", "-w", str(target), str(RUNTIME))
        for wheel in target.glob("*.whl"):
            flat = WHEELHOUSE / wheel.name
            if not flat.exists():
                os.link(wheel, flat)
    download_torch_variants()
    stamp.write_text(digest + "\n")
    summary = ", ".join(f"{name}: {len(list((WHEELHOUSE / name).glob('*.whl')))}" for name in requirement_sets())
    print(f"wheelhouse {WHEELHOUSE.relative_to(ROOT)}: {summary} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
