"""One OIP datatype table: the runtime (runtime/src/sovereign_runtime/protocol.py) and the collection
(plugins/module_utils/_oip.py, which the deploy's smoke test and release checks use) are separate
packages with a copy each; this pins them equal.

It lives with the runtime tests because the runtime needs torch, and torch refuses to share a process
with ansible's module_utils (which patches sys.intern; see the Makefile's UNIT_GROUPS). ``_oip.py`` has
no ansible imports, so it is loaded here straight from its file, without ansible.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import torch
from conftest import ROOT, make_engine
from sovereign_runtime import protocol
from sovereign_runtime.model import load

OIP_PY = ROOT / "plugins" / "module_utils" / "_oip.py"


def collection_oip():
    spec = importlib.util.spec_from_file_location("sovereign_collection_oip", OIP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_and_collection_share_one_grpc_contents_table():
    """The typed-contents field of each datatype: the runtime's gRPC server and the collection's hand-written codec
    (plugins/module_utils/_oip_grpc.py, the smoke test's; it imports only _oip of the collection, no ansible)."""
    from sovereign_runtime import grpc_server

    spec = importlib.util.spec_from_file_location("sovereign_collection_oip_grpc", OIP_PY.with_name("_oip_grpc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert grpc_server.CONTENTS_FIELD == module.CONTENTS_FIELD
    assert set(module.CONTENTS_FIELD) | {"FP16", "BF16"} == protocol.OIP_DATATYPES


def test_runtime_and_collection_share_one_datatype_set():
    oip = collection_oip()
    assert "ansible" not in Path(OIP_PY).read_text().split("import", 1)[0]  # loaded without ansible
    assert protocol.OIP_DATATYPES == oip.OIP_DATATYPES
    # Everything the runtime accepts or answers with is in that set (BYTES is known but refused).
    assert set(protocol.OIP_TO_TORCH) == protocol.OIP_DATATYPES - {"BYTES"}
    assert set(protocol.TORCH_TO_OIP.values()) <= oip.OIP_DATATYPES
    assert set(protocol.NUMPY_TO_OIP.values()) <= oip.OIP_DATATYPES


def test_a_bf16_answer_passes_the_collections_response_check(tmp_path, client_for):
    """The defect this pins: a bf16 model passed readiness, then failed the deploy's smoke test because
    _oip.check_tensor refused BF16. A real bf16 TorchScript model, served by a real engine."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2).to(torch.bfloat16).eval()
    path = tmp_path / "bf16.ts"
    torch.jit.script(module).save(str(path))
    x = torch.linspace(-1, 1, 8).reshape(2, 4).to(torch.bfloat16)
    with torch.no_grad():
        y = module(x)

    def tensor(name, t):
        return {"name": name, "datatype": "BF16", "shape": list(t.shape), "data": t.float().flatten().tolist()}

    golden = {"inputs": [tensor("input__0", x)], "outputs": [tensor("output__0", y)], "rtol": 1e-2, "atol": 1e-2}
    Path(f"{path}.golden.json").write_text(protocol.dumps(golden).decode())
    engine = make_engine(load(str(path), name="bf16"))
    assert engine.golden_report["ok"], engine.golden_report  # it passes readiness ...
    resp = asyncio.run(client_for(engine).post("/v2/models/bf16/infer", protocol.dumps({"inputs": golden["inputs"]})))
    assert resp.status == 200, resp.body
    answer = resp.json()
    assert answer["outputs"][0]["datatype"] == "BF16"
    oip = collection_oip()
    assert oip.check_infer_response(answer, "bf16") is None  # ... and now the deploy's checks too
    assert oip.compare_outputs(answer["outputs"], golden["outputs"], 1e-2, 1e-2) is None
