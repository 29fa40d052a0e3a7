"""Regenerate the runtime's committed gRPC message module from its .proto (hosts need no protoc).

    python scripts/grpc_stubs.py          # rewrite runtime/src/sovereign_runtime/oip_grpc/oip_v2_pb2.py
    python scripts/grpc_stubs.py --check  # exit 1 when the committed module differs from a fresh generation

Needs grpcio-tools (its bundled protoc), in any venv: its protobuf pin need not be the runtime's, the generated
module runs on any protobuf runtime at least as new as the generator (the version it names). Only the message
module is generated: the service's handlers are registered by hand (grpc_server.py).

One change is made to protoc's output: the file is added to a descriptor pool of its own instead of protobuf's
default pool, so ``inference.*`` messages of another copy of the protocol in the same process (tritonclient's,
in the tests) do not collide with these.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runtime" / "src" / "sovereign_runtime" / "oip_grpc"
PROTO = PACKAGE / "oip_v2.proto"
MODULE = PACKAGE / "oip_v2_pb2.py"
HEADER = """\
# Generated from oip_v2.proto (beside this file) by protoc through scripts/grpc_stubs.py; do not edit: edit the
# .proto and run the script. Origin and licence: those of oip_v2.proto (written for sovereign-runtime from the
# Open Inference Protocol v2 specification, Apache-2.0). Excluded from ruff (runtime/pyproject.toml).
"""
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "POOL = _descriptor_pool.DescriptorPool()  # not the default pool: see scripts/grpc_stubs.py\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def generate() -> str:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PACKAGE}", f"--python_out={out}", PROTO.name]
        subprocess.run(cmd, check=True, cwd=PACKAGE)
        text = (Path(out) / MODULE.name).read_text()
    if DEFAULT_POOL not in text:
        raise SystemExit(f"protoc's output has no {DEFAULT_POOL!r}: update scripts/grpc_stubs.py for this protoc")
    return HEADER + text.replace(DEFAULT_POOL, OWN_POOL)


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        if MODULE.read_text() != text:
            print(f"{MODULE.relative_to(ROOT)} is stale: run python scripts/grpc_stubs.py", file=sys.stderr)
            return 1
        return 0
    MODULE.write_text(text)
    print(f"wrote {MODULE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
