"""Test fixture: a small real TorchScript model (MLP 4->8->2) with its golden input/output.

Writes DEST/model.pt and DEST/model.pt.golden.json (the runtime's convention for a golden file
next to a TorchScript archive). Deterministic: the same seed gives the same weights and outputs.
"""

import json
import sys
from pathlib import Path

import torch


def main(dest: Path) -> None:
    torch.manual_seed(20261121)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    dest.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(str(dest / "model.pt"))
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 3.0]])
    with torch.inference_mode():
        y = model(x)
    golden = {
        "inputs": [{"name": "input-0", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}],
        "outputs": [{"name": "output-0", "shape": list(y.shape), "datatype": "FP32", "data": y.flatten().tolist()}],
        "rtol": 1e-4,
        "atol": 1e-5,
    }
    (dest / "model.pt.golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
