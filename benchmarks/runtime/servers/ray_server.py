"""Ray Serve: a local 1-CPU Ray, one replica, @serve.batch when BENCH_BATCH > 1. Without direct ingress the
Serve HTTP proxy listens on PORT; with it (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, no proxy is started) the replica's
own HTTP server does (the launcher sets RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT to PORT).

    python ray_server.py MODEL_DIR PORT
"""

import os
import signal
import sys
import time

import ray
import torch
from common import load_model
from ray import serve
from starlette.requests import Request

MODEL_DIR, PORT = sys.argv[1], int(sys.argv[2])
BATCH = int(os.environ.get("BENCH_BATCH", "1"))
WAIT = float(os.environ.get("BENCH_WAIT_MS", "2")) / 1000


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Model:
    def __init__(self, model_dir: str) -> None:
        self.model, _, _ = load_model(model_dir)

    @serve.batch(max_batch_size=max(BATCH, 1), batch_wait_timeout_s=WAIT)
    async def batched(self, rows: list[list[float]]) -> list[list[float]]:
        return self.model(torch.tensor(rows, dtype=torch.float32)).tolist()

    async def __call__(self, request: Request) -> dict:
        rows = (await request.json())["input"]
        if BATCH > 1:
            return {"output": [await self.batched(rows[0])]}
        return {"output": self.model(torch.tensor(rows, dtype=torch.float32)).tolist()}


def _shutdown(*_):
    serve.shutdown()
    ray.shutdown()  # ends the local Ray this script started (GCS, raylet, workers)
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _shutdown)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT}, logging_config={"enable_access_log": False})
    serve.run(Model.bind(MODEL_DIR), name="m", route_prefix="/", blocking=False)
    while True:
        time.sleep(3600)
