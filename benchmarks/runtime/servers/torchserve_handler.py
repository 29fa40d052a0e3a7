"""TorchServe handler: a module-level ``handle`` (TorchServe's function handler form), batch-aware.

The model comes from BENCH_MODEL_DIR (the benchmark's weights), not from the archive.
"""

import json
import os

import torch
from common import load_model

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model, _, _ = load_model(os.environ["BENCH_MODEL_DIR"])
    if data is None:
        return None
    rows = []
    for item in data:
        body = item.get("body") if item.get("body") is not None else item.get("data")
        if isinstance(body, bytes | bytearray):
            body = json.loads(body)
        rows.append(body["input"])
    y = _model(torch.tensor(rows, dtype=torch.float32))
    return [{"output": r} for r in y.tolist()]
