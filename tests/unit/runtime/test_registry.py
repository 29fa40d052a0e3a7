"""models:/ URIs resolved once, at start, against a REAL MLflow tracking server (sqlite backend, loopback).

One test function on purpose: the MLflow server is a session fixture that takes 10-25 s to start on
this machine, and pytest-xdist would start one per worker if the cases were spread over several tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings

import pytest
import torch
from conftest import IN, infer_body
from sovereign_runtime.config import Settings
from sovereign_runtime.engine import Engine
from sovereign_runtime.model import ModelLoadError
from sovereign_runtime.startup import prepare


def test_registry_uris_resolve_once(mlflow_server, models, tmp_path, client_for, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature
        from mlflow.tracking import MlflowClient

        x = models.golden_x
        golden = tmp_path / "golden.json"
        golden.write_text(json.dumps(models.golden()))
        sig = infer_signature(x.numpy(), models.expected(x).numpy())
        mlflow.set_tracking_uri(mlflow_server.url)
        client = MlflowClient(mlflow_server.url)
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(
                models.module,
                name="model",
                signature=sig,
                input_example=x.numpy(),
                pip_requirements=[],
                extra_files=[str(golden)],  # -> extra_files/golden.json inside the model
            )
        # two versions of "tiny" (the same weights); the alias points at the second
        versions = [mlflow.register_model(info.model_uri, "tiny").version for _ in range(2)]
        client.set_registered_model_alias("tiny", "champion", versions[1])

    cases = [
        ("models:/tiny@champion", str(versions[1])),
        ("models:/tiny/1", "1"),
        ("models:/tiny/latest", str(versions[-1])),
    ]
    for uri, version in cases:
        engine = Engine(Settings(model_uri=uri, tracking_uri=mlflow_server.url, color="green"))
        report = prepare(engine)
        assert report["ok"], (uri, report)
        engine.set_ready()
        model = engine.model
        assert (model.name, model.version) == ("tiny", version), uri
        assert model.source == f"models:/tiny/{version} (from {uri})"
        assert model.golden.source == "model:extra_files/golden.json"
        client = client_for(engine)

        async def go(client=client, version=version):
            meta = await client.get("/v2/models/tiny")
            infer = await client.post(f"/v2/models/tiny/versions/{version}/infer", infer_body(torch.ones(2, IN)))
            metrics = await client.get("/metrics")
            return meta, infer, metrics

        meta, infer, metrics = asyncio.run(go())
        assert meta.json()["versions"] == [version]
        assert infer.status == 200 and infer.json()["model_version"] == version
        info = next(x for x in metrics.body.decode().splitlines() if x.startswith("sovereign_runtime_model_info{"))
        assert f'version="{version}"' in info and 'model="tiny"' in info and 'color="green"' in info

    for uri, words in (("models:/tiny@nobody", "nobody"), ("models:/absent/1", "absent")):
        t0 = time.monotonic()
        with pytest.raises(ModelLoadError, match=words) as info:
            prepare(Engine(Settings(model_uri=uri, tracking_uri=mlflow_server.url)))
        # the server answered "no such thing": not retried (the schedule would wait 30 s)
        assert time.monotonic() - t0 < 10 and str(info.value).startswith("could not fetch")
