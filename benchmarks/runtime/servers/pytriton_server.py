"""PyTriton: the Triton server its wheel ships, one model instance, OIP v2 REST; dynamic batching from BENCH_BATCH.

python pytriton_server.py MODEL_DIR HTTP_PORT GRPC_PORT METRICS_PORT
"""

import os
import sys

import numpy as np
import torch
from common import load_model
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

BATCH = int(os.environ.get("BENCH_BATCH", "0"))
WAIT_US = int(float(os.environ.get("BENCH_WAIT_MS", "2")) * 1000)
model, width, out_width = load_model(sys.argv[1])


@batch
def infer(input__0):
    return {"output__0": model(torch.from_numpy(input__0)).numpy()}


if __name__ == "__main__":
    http, grpc, metrics = (int(p) for p in sys.argv[2:5])
    config = TritonConfig(http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=grpc,
                          metrics_port=metrics, allow_metrics=False, log_verbose=0)  # fmt: skip
    batcher = DynamicBatcher(max_queue_delay_microseconds=WAIT_US) if BATCH > 1 else None
    with Triton(config=config) as triton:
        triton.bind(
            model_name="m",
            infer_func=infer,
            inputs=[Tensor(name="input__0", dtype=np.float32, shape=(width,))],
            outputs=[Tensor(name="output__0", dtype=np.float32, shape=(out_width,))],
            config=ModelConfig(max_batch_size=max(BATCH, 1), batcher=batcher, batching=BATCH > 1),
            strict=False,
        )
        triton.serve()
