"""What every peer's server script shares: the benchmark's model, loaded the same way everywhere.

Runs inside a peer's own venv (torch and the standard library only). bench.py writes ``peer_model.json``
(the layer widths) and ``weights.pt`` (the state_dict) next to the MLflow model that sovereign-runtime and
mlflow load, so every server computes the same function; bench.py checks each answer against golden.json.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch


def load_model(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, int, int]:
    """(eval-mode MLP, input width, output width); one intra-op thread (one core per server), no autograd."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    dims = json.loads((Path(model_dir) / "peer_model.json").read_text())["dims"]
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    model.load_state_dict(torch.load(Path(model_dir) / "weights.pt", weights_only=True))
    return model.eval(), dims[0], dims[-1]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
