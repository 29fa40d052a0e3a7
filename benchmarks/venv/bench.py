#!/usr/bin/env python3
"""Filling a color's venv: pip (what roles/inference_runtime did) vs uv (roles/_common venv, ADR 0007), side by side.

    make bootstrap                       # builds .cache/wheelhouse/runtime (with the uv wheel)
    python benchmarks/venv/bench.py      # 2 rounds, the runtime's packages as a CPU host installs them
    python benchmarks/venv/bench.py --rounds 3 --packages "sovereign-runtime[feast,flags,mlflow]"

Each round, one after the other on the same machine: a fresh venv (Debian's /usr/bin/python3 -m venv, as the role
makes it) filled by ``pip install --no-index --find-links <wheelhouse>`` (bytecode compiled, pip's default), then a
fresh venv filled by ``uv pip install`` with the role's flags (offline, --compile-bytecode, --link-mode hardlink) and an
empty uv cache ("uv, first venv": what a fresh host pays for its first color), then another fresh venv from the now
warm cache ("uv, second venv": the other color). Wall time of each install command only (the venv creation is the
same for all and is not counted). Everything in a temporary directory, removed at the end. Not a test: it prints a
table and the ratios to pip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / ".cache" / "wheelhouse" / "runtime"


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return took


def venv(path: Path) -> Path:
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--packages", default="sovereign-runtime", help="what to install (the role's requirement)")
    ap.add_argument("--wheelhouse", type=Path, default=WHEELHOUSE)
    args = ap.parse_args()
    uv_wheels = sorted(args.wheelhouse.glob("uv-*.whl"))
    if not uv_wheels:
        raise SystemExit(f"no uv wheel in {args.wheelhouse}: run `make bootstrap`")
    packages = args.packages.split()
    times: dict[str, list[float]] = {"pip": [], "uv, first venv (cold cache)": [], "uv, second venv (warm cache)": []}
    with tempfile.TemporaryDirectory(prefix="venv-bench-") as tmp_s:
        tmp = Path(tmp_s)
        tools = venv(tmp / "uv-home")
        subprocess.run([str(tools), "-m", "pip", "install", "-q", "--no-index", str(uv_wheels[0])], check=True)
        uv = str(tmp / "uv-home" / "bin" / "uv")
        links = ["--find-links", str(args.wheelhouse)]
        for r in range(args.rounds):
            py = venv(tmp / f"pip-{r}")
            pip_argv = [str(py), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check"]
            times["pip"].append(timed([*pip_argv, *links, *packages]))
            cache = tmp / f"cache-{r}"
            for n, label in enumerate(("uv, first venv (cold cache)", "uv, second venv (warm cache)")):
                py = venv(tmp / f"uv{n}-{r}")
                times[label].append(timed([uv, "pip", "install", "-q", "--python", str(py), "--no-index", *links,
                                           "--cache-dir", str(cache), "--link-mode", "hardlink", "--compile-bytecode",
                                           "--no-config", *packages]))  # fmt: skip
            print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
            for path in tmp.glob(f"*-{r}*"):
                shutil.rmtree(path, ignore_errors=True)
    pip = statistics.median(times["pip"])
    print(f"# {args.packages} from {args.wheelhouse}, {args.rounds} rounds, median wall seconds of the install command")
    print(f"{'installer':32} {'median s':>9} {'÷ pip':>7}  rounds")
    for label, values in times.items():
        med = statistics.median(values)
        print(f"{label:32} {med:>9.1f} {med / pip:>7.2f}  {' '.join(f'{v:.1f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
