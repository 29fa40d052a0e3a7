"""Ray Serve: a local 1-CPU Ray, one replica; the Serve HTTP proxy on PROXY_PORT and, with direct ingress
(RAY_SERVE_ENABLE_DIRECT_INGRESS=1, the replica's own uvicorn), the replica itself on DIRECT_PORT.
@serve.batch when BENCH_BATCH > 1.

    python ray_server.py MODEL_DIR PROXY_PORT DIRECT_PORT
"""

import os
import signal
import sys
import time

MODEL_DIR, PROXY, DIRECT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(DIRECT))
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(DIRECT + 1))

import ray  # noqa: E402  (the Serve constants are read from the environment at import)
import torch  # noqa: E402
from common import load_model  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

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
    serve.start(http_options={"host": "127.0.0.1", "port": PROXY}, logging_config={"enable_access_log": False})
    serve.run(Model.bind(MODEL_DIR), name="m", route_prefix="/", blocking=False)
    while True:
        time.sleep(3600)
