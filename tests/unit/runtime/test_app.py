"""The OIP v2 HTTP surface, driven in-process through the ASGI app: health, metadata, infer, metrics."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from conftest import IN, OUT, infer_body, make_engine
from sovereign_runtime.engine import READY
from sovereign_runtime.server import RuntimeServer


@pytest.mark.parametrize("fmt", ["torchscript", "mlflow_pt2", "mlflow_pickle"])
def test_infer_matches_torch(fmt, loaded, models, client_for):
    engine = make_engine(loaded[fmt], color="green")
    client = client_for(engine)
    name = engine.model.name
    x = torch.randn(5, IN)

    async def go():
        return await client.post(f"/v2/models/{name}/infer", infer_body(x, id="req-7"))

    resp = asyncio.run(go())
    assert resp.status == 200, resp.body
    doc = resp.json()
    assert doc["model_name"] == name and doc["model_version"] == "1" and doc["id"] == "req-7"
    assert resp.headers[b"x-sovereign-model-version"] == b"1"  # every answer names the model version (ADR 1401)
    (out,) = doc["outputs"]
    assert out["name"] == "output__0" and out["datatype"] == "FP32" and out["shape"] == [5, OUT]
    assert torch.allclose(torch.tensor(out["data"]).reshape(5, OUT), models.expected(x), atol=1e-6)


def test_metadata_and_versions_paths(loaded, client_for):
    engine = make_engine(loaded["mlflow_pt2"], color="blue")
    client = client_for(engine)

    async def go():
        return [
            await client.get("/v2/models/mlp"),
            await client.get("/v2/models/mlp/versions/1"),
            await client.get("/v2/models/mlp/ready"),
            await client.get("/v2/models/mlp/versions/1/ready"),
            await client.post("/v2/models/mlp/versions/1/infer", infer_body(torch.zeros(1, IN))),
            await client.get("/v2/models/mlp/versions/9"),
            await client.get("/v2"),
        ]

    meta, meta_v, ready, ready_v, infer_v, wrong_version, server = asyncio.run(go())
    assert meta.status == meta_v.status == 200
    doc = meta.json()
    assert doc["name"] == "mlp" and doc["versions"] == ["1"] and doc["platform"] == "pytorch"
    assert doc["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, IN]}]
    assert doc["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, OUT]}]
    params = doc["parameters"]
    assert params["color"] == "blue" and params["format"] == "mlflow-pt2" and params["max_batch_size"] == 16
    # the golden example itself, for smoke tests to replay (plugins/modules/smoke_test.py reads it)
    assert params["golden_source"] == "model:golden.json"
    assert set(params["golden"]) == {"inputs", "outputs", "rtol", "atol"}
    assert params["golden"]["inputs"][0]["name"] == "input__0"
    assert ready.status == ready_v.status == infer_v.status == 200
    assert ready.json() == {"name": "mlp", "ready": True}
    assert wrong_version.status == 404 and "version" in wrong_version.json()["error"]
    assert server.status == 200 and server.json()["name"] == "sovereign-runtime"


def test_requested_outputs_filter(loaded, client_for):
    client = client_for(make_engine(loaded["mlflow_pt2"]))
    body = infer_body(torch.zeros(2, IN), outputs=[{"name": "output__0"}])
    resp = asyncio.run(client.post("/v2/models/mlp/infer", body))
    assert resp.status == 200 and [o["name"] for o in resp.json()["outputs"]] == ["output__0"]


def test_health_transitions_loading_ready_draining(models, client_for):
    """The server's own start-up path: live at once, ready only after load + warm-up + golden check,
    ready 503 again as soon as draining starts while inference keeps being answered."""
    from sovereign_runtime.config import Settings

    server = RuntimeServer(Settings(model_uri=str(models.mlflow_pt2), model_name="mlp", gc_freeze=False))
    app, engine = server.app, server.engine
    client = client_for(engine)

    async def go():
        sent = []
        startup = [{"type": "lifespan.startup"}]

        async def receive():
            return startup.pop(0) if startup else await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        lifespan = asyncio.create_task(app({"type": "lifespan"}, receive, send))
        await asyncio.sleep(0)
        while not sent:
            await asyncio.sleep(0.01)
        early = [await client.get("/v2/health/live"), await client.get("/v2/health/ready")]
        early.append(await client.post("/v2/models/mlp/infer", infer_body(torch.zeros(1, IN))))
        for _ in range(3000):  # the loader thread needs ~1-2 s; bounded, not timed
            if engine.state == READY:
                break
            await asyncio.sleep(0.01)
        ready = await client.get("/v2/health/ready")
        server.drain()  # what SIGTERM does
        draining = [await client.get("/v2/health/ready"), await client.get("/v2/models/mlp/ready")]
        still = await client.post("/v2/models/mlp/infer", infer_body(torch.zeros(1, IN)))
        lifespan.cancel()
        return early, ready, draining, still

    (live, not_ready, early_infer), ready, (draining, model_draining), still = asyncio.run(go())
    assert live.status == 200 and live.json() == {"live": True}
    # The loader thread may already be done on a fast machine; if not, this is the loading answer.
    if not_ready.status == 503:
        assert not_ready.json()["state"] == "loading"
        assert early_infer.status == 503 and early_infer.headers[b"retry-after"] == b"1"
    assert ready.status == 200 and ready.json() == {"ready": True}
    assert draining.status == 503 and draining.json()["state"] == "draining"
    assert model_draining.status == 503
    assert still.status == 200


def test_metrics_names_present(loaded, client_for):
    engine = make_engine(loaded["mlflow_pt2"], color="green")
    client = client_for(engine)

    async def go():
        await client.post("/v2/models/mlp/infer", infer_body(torch.zeros(1, IN)))
        await client.post("/v2/models/mlp/infer", b"{")
        return await client.get("/metrics")

    resp = asyncio.run(go())
    assert resp.status == 200 and resp.headers[b"content-type"].startswith(b"text/plain")
    text = resp.body.decode()
    for name in (
        "sovereign_runtime_requests_total",
        "sovereign_runtime_request_duration_seconds_bucket",
        "sovereign_runtime_queue_duration_seconds_bucket",
        "sovereign_runtime_compute_duration_seconds_bucket",
        "sovereign_runtime_batch_size_bucket",
        "sovereign_runtime_in_flight_requests",
        "sovereign_runtime_queue_depth",
        "sovereign_runtime_queue_capacity",
        "sovereign_runtime_model_info",
        "sovereign_runtime_model_load_seconds",
        "sovereign_runtime_ready",
    ):
        assert name in text, name
    assert 'sovereign_runtime_requests_total{code="200",endpoint="infer",model="mlp"} 1.0' in text
    assert 'sovereign_runtime_requests_total{code="400",endpoint="infer",model="mlp"} 1.0' in text
    info = next(line for line in text.splitlines() if line.startswith("sovereign_runtime_model_info{"))
    for label in ('model="mlp"', 'version="1"', 'color="green"', 'device="cpu"', 'format="mlflow-pt2"'):
        assert label in info
    # buckets fine enough between 0.1 ms and 100 ms
    les = [
        float(line.split('le="')[1].split('"')[0])
        for line in text.splitlines()
        if line.startswith("sovereign_runtime_request_duration_seconds_bucket") and "+Inf" not in line
    ]
    assert len([le for le in les if 0.0001 <= le <= 0.1]) >= 15


def test_head_and_json_everywhere(loaded, client_for):
    client = client_for(make_engine(loaded["torchscript"]))

    async def go():
        return await client.request("HEAD", "/v2/health/ready"), await client.get("/v2/models/nope")

    head, unknown = asyncio.run(go())
    assert head.status == 200 and head.body == b""
    assert unknown.status == 404 and "unknown model" in json.loads(unknown.body)["error"]
