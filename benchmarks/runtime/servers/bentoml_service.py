"""BentoML: one worker, a sync numpy API; adaptive batching when BENCH_BATCH=1.

BENCH_MODEL_DIR=DIR BENCH_BATCH=0|1 bentoml serve bentoml_service:Model --port PORT
"""

import os

import bentoml
import numpy as np
import torch
from common import env_flag, load_model

BATCH = env_flag("BENCH_BATCH")


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Model:
    def __init__(self) -> None:
        self.model, _, _ = load_model(os.environ["BENCH_MODEL_DIR"])

    @bentoml.api(batchable=BATCH, batch_dim=0, max_batch_size=16, max_latency_ms=1000)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
