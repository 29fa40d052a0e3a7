"""KServe's model server (``kserve.ModelServer``), OIP v2 REST, one worker; flags as kserve parses them
(``--http_port``, ``--workers``, ``--enable_grpc`` ...), the model from BENCH_MODEL_DIR.

    BENCH_MODEL_DIR=DIR python kserve_server.py --http_port PORT --workers 1 --enable_grpc false
"""

import os

import torch
from common import load_model
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class MLP(Model):
    def __init__(self, name: str, model_dir: str) -> None:
        super().__init__(name)
        self.net, _, _ = load_model(model_dir)
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        y = self.net(torch.from_numpy(payload.inputs[0].as_numpy())).numpy()
        out = InferOutput(name="output__0", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


if __name__ == "__main__":
    ModelServer().start([MLP("m", os.environ["BENCH_MODEL_DIR"])])
