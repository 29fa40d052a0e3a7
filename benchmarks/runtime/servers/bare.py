"""The lean bare reference endpoint: uvicorn + uvloop + httptools, raw ASGI, inline forward, gc.freeze.

No framework, validation, metrics, batching or logging: the floor of a Python HTTP JSON server with this
model on one core. It speaks the OIP v2 JSON body sovereign-runtime gets (``inputs[0]`` data and shape).

    python bare.py MODEL_DIR PORT
"""

import gc
import json
import sys

import torch
import uvicorn
from common import load_model

model, _, _ = load_model(sys.argv[1])
HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # /v2/health/ready
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    tensor = json.loads(body)["inputs"][0]
    y = model(torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"]))
    out = json.dumps(
        {"model_name": "m", "outputs": [{"name": "output__0", "datatype": "FP32", "shape": list(y.shape),
                                         "data": y.ravel().tolist()}]}
    ).encode()  # fmt: skip
    await send(
        {"type": "http.response.start", "status": 200, "headers": [*HEADERS, (b"content-length", b"%d" % len(out))]}
    )
    await send({"type": "http.response.body", "body": out})


if __name__ == "__main__":
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning")  # fmt: skip
