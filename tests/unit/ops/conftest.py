"""Makes ops/sovereign_ops importable from this checkout (the package is not installed into .venv)."""

import pathlib
import sys

OPS = pathlib.Path(__file__).resolve().parents[3] / "ops"
if str(OPS) not in sys.path:
    sys.path.insert(0, str(OPS))
