"""Test fixtures for molecule/release: two real TorchScript models and broken variants.

DEST/v1/model.pt, DEST/v2/model.pt: the same MLP shape (4->8->2) with different weights, each with its
golden file (<file>.golden.json, the runtime's convention), like molecule/inference_runtime/files/make_model.py.
DEST/broken/model.pt: bytes that are not a model (the runtime exits with load_failed), with v2's golden.
DEST/wrong-golden.json: v2's golden input with outputs that are off by 1 (a smoke test against v2 fails).
Deterministic: fixed seeds.
"""

import json
import sys
from pathlib import Path

import torch

X = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 3.0]])


def golden(model):
    with torch.inference_mode():
        y = model(X)
    return {
        "inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP32", "data": X.flatten().tolist()}],
        "outputs": [{"name": "output-0", "shape": list(y.shape), "datatype": "FP32", "data": y.flatten().tolist()}],
        "rtol": 1e-4,
        "atol": 1e-5,
    }


def make(dest: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    dest.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(dest / "model.pt"))
    g = golden(model)
    (dest / "model.pt.golden.json").write_text(json.dumps(g, indent=1) + "\n")
    return g


def main(dest: Path) -> None:
    make(dest / "v1", 20261121)
    g2 = make(dest / "v2", 20261122)
    broken = dest / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "model.pt").write_bytes(b"this is not a TorchScript archive\n")
    (broken / "model.pt.golden.json").write_text(json.dumps(g2, indent=1) + "\n")
    wrong = json.loads(json.dumps(g2))
    wrong["outputs"][0]["data"] = [v + 1.0 for v in wrong["outputs"][0]["data"]]
    (dest / "wrong-golden.json").write_text(json.dumps(wrong, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
