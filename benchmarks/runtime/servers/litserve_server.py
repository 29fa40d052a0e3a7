"""LitServe: one API server process and one inference worker on the CPU; batching from BENCH_BATCH.

python litserve_server.py MODEL_DIR PORT
"""

import os
import sys

import litserve as ls
import torch
from common import load_model

BATCH = int(os.environ.get("BENCH_BATCH", "1"))
WAIT = float(os.environ.get("BENCH_WAIT_MS", "2")) / 1000


class API(ls.LitAPI):
    def setup(self, device):
        self.model, _, _ = load_model(sys.argv[1])

    def decode_request(self, request):
        return torch.tensor(request["input"], dtype=torch.float32)

    def predict(self, x):
        if x.dim() == 1:
            return self.model(x.unsqueeze(0))[0]
        return self.model(x)  # a batch: LitServe stacked the decoded rows

    def encode_response(self, output):
        return {"output": output.tolist()}


if __name__ == "__main__":
    api = API(max_batch_size=BATCH, batch_timeout=WAIT) if BATCH > 1 else API()
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=True, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), num_api_servers=1, generate_client_file=False,
               log_level="warning")  # fmt: skip
