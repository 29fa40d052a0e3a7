"""Entity-keyed inference: the runtime fetches the model's features from Feast's online store in-process.

Real all the way: a `redis-server` process on a free loopback port (password, no persistence), a Feast
repository applied (file registry) and materialized from a parquet offline source into it with the Feast SDK,
the runtime's engine and ASGI app serving a real torch model. The outage tests stop that Redis and start it
again on the same port.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import IN, infer_body, make_engine
from feast_testrepo import RedisServer, apply_and_materialize, feature_store_yaml, redis_server_binary

pytest.importorskip("feast", reason="the runtime's [feast] extra is not installed")
if redis_server_binary() is None:  # scripts/bootstrap.sh installs it; say so rather than skip silently
    pytest.fail("redis-server is not installed: run scripts/bootstrap.sh (Debian's redis-server)", pytrace=False)

from sovereign_runtime.model import Golden, ModelLoadError
from sovereign_runtime.startup import attach_features, check_entity_golden

SERVICE = "mlp"  # named after the model, as the churn example names its service
KEYS = list(range(1, 41))
MISSING = 999
AS_OF = "2026-11-01T00:00:00+00:00"


def features_of(key: int) -> list[float]:
    """The value each entity holds in the offline source (exactly representable in float32)."""
    return [key / 4.0, -key / 8.0, (key % 5) * 0.5, 1.0 if key % 2 else -1.0]


GOLDEN_KEYS = [101, 102, 103]  # entities holding the rows of the test models' golden input


class Repo:
    def __init__(self, root: Path, golden_x: torch.Tensor) -> None:
        import pandas as pd
        from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
        from feast.types import Float32

        self.root = root
        self.redis = RedisServer(root / "redis").start()
        self.path = root / "repo"
        self.path.mkdir()
        rows = [features_of(k) for k in KEYS] + golden_x.tolist()
        frame = pd.DataFrame({"customer_id": pd.Series(KEYS + GOLDEN_KEYS, dtype="int64")})
        frame["event_timestamp"] = pd.Timestamp(AS_OF)
        for j in range(IN):
            frame[f"f{j}"] = pd.Series([row[j] for row in rows], dtype="float32")
        frame.to_parquet(self.path / "source.parquet", index=False)
        (self.path / "feature_store.yaml").write_text(feature_store_yaml("fftest", self.redis, root / "registry.db"))
        customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
        source = FileSource(name="src", path=str(self.path / "source.parquet"), timestamp_field="event_timestamp")
        view = FeatureView(
            name="mlp_features",
            entities=[customer],
            ttl=None,
            schema=[Field(name=f"f{j}", dtype=Float32) for j in range(IN)],
            source=source,
            online=True,
        )
        self.definitions = [customer, source, view, FeatureService(name=SERVICE, features=[view])]
        self.materialize()

    def materialize(self) -> None:
        apply_and_materialize(self.path, self.definitions)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, models):
    r = Repo(tmp_path_factory.mktemp("feast"), models.golden_x)
    yield r
    r.redis.stop()


def keyed_body(keys: list[int], name: str = "customer_id", datatype: str = "INT64", **extra) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": [len(keys)], "data": keys}], **extra}
    ).encode()


def engine_for(loaded, repo: Repo, **overrides):
    engine = make_engine(
        loaded["mlflow_pt2"], feature_service=SERVICE, feast_repo=str(repo.path), feature_retry_s=0.3, **overrides
    )
    attach_features(engine)
    return engine


def run(coro):
    return asyncio.run(coro)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_entity_keyed_request_gets_the_features_in_model_order(loaded, models, repo, client_for):
    engine = engine_for(loaded, repo)
    client = client_for(engine)
    keys = [3, 17, 40]
    x = torch.tensor([features_of(k) for k in keys])

    async def go():
        return (
            await client.post("/v2/models/mlp/infer", keyed_body(keys, id="by-key")),
            await client.post("/v2/models/mlp/infer", infer_body(x)),  # the vector still works
            await client.get("/v2/models/mlp"),
            await client.get("/v2/health/ready"),
            await client.get("/metrics"),
        )

    keyed, vector, meta, ready, metrics = run(go())
    assert keyed.status == 200, keyed.body
    doc = keyed.json()
    assert doc["id"] == "by-key" and doc["outputs"][0]["shape"] == [3, 2]
    got = torch.tensor(doc["outputs"][0]["data"]).reshape(3, 2)
    assert torch.allclose(got, models.expected(x), atol=1e-6)
    assert vector.status == 200 and vector.json()["outputs"] == doc["outputs"]
    service = meta.json()["parameters"]["feature_service"]
    assert service == {"name": SERVICE, "entity_key": "customer_id", "features": ["f0", "f1", "f2", "f3"]}
    assert ready.status == 200
    details = ready.json()["details"]["feature_store"]
    assert details["up"] is True and details["feature_service"] == SERVICE
    assert "feast-test-secret" not in ready.body.decode()  # the connection string's password is never shown
    text = metrics.body.decode()
    assert metric(text, "sovereign_runtime_feature_fetch_duration_seconds_count") == 1
    assert 'sovereign_runtime_feature_fetches_total{feature_service="mlp",model="mlp",result="ok"} 1.0' in text
    assert metric(text, "sovereign_runtime_feature_store_up") == 1


def test_mixed_batch_of_keyed_and_vector_requests_shares_one_forward(loaded, models, repo, client_for):
    engine = engine_for(loaded, repo)
    engine.busy = None  # unknown concurrency: every request joins the batch queue
    client = client_for(engine)
    keyed = [[k] for k in (1, 2, 3)] + [[4, 5]]
    vectors = [torch.tensor([features_of(k)]) for k in (6, 7)]

    async def go():
        reqs = [client.post("/v2/models/mlp/infer", keyed_body(k)) for k in keyed]
        reqs += [client.post("/v2/models/mlp/infer", infer_body(v)) for v in vectors]
        return await asyncio.gather(*reqs)

    answers = run(go())
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    for keys, answer in zip([*keyed, [6], [7]], answers, strict=True):
        want = models.expected(torch.tensor([features_of(k) for k in keys]))
        assert torch.allclose(torch.tensor(answer.json()["outputs"][0]["data"]).reshape(want.shape), want, atol=1e-6)
    # the six requests (seven rows) ran as batches larger than one row: keyed and vector rows together
    assert engine.metrics.batch_size.counts[0] == 0 or sum(engine.metrics.batch_size.counts[1:]) >= 1
    assert max(i for i, c in enumerate(engine.metrics.batch_size.counts) if c) >= 4  # bucket of >= 6 rows


def test_unknown_entity_is_a_404_naming_the_key_and_never_reaches_the_model(loaded, repo, client_for):
    engine = engine_for(loaded, repo)
    client = client_for(engine)
    calls = []
    forward = engine.forward
    engine.forward = lambda t: calls.append(t) or forward(t)

    async def go():
        return (
            await client.post("/v2/models/mlp/infer", keyed_body([2, MISSING])),
            await client.post("/v2/models/mlp/infer", keyed_body([2], datatype="FP32")),
            await client.post("/v2/models/mlp/infer", keyed_body([2.5])),
            await client.get("/metrics"),
        )

    unknown, bad_type, bad_key, metrics = run(go())
    assert unknown.status == 404
    assert f"customer_id={MISSING}" in unknown.json()["error"] and "mlp" in unknown.json()["error"]
    assert bad_type.status == 400 and "INT64" in bad_type.json()["error"]
    assert bad_key.status == 400 and "customer_id" in bad_key.json()["error"]
    assert calls == []  # nothing was fed to the model: no nulls, no zeros
    assert 'result="unknown_entity"} 1.0' in metrics.body.decode()
    both = json.dumps(
        {"inputs": [json.loads(keyed_body([1]))["inputs"][0], json.loads(infer_body(torch.zeros(1, IN)))["inputs"][0]]}
    )
    resp = run(client.post("/v2/models/mlp/infer", both.encode()))
    assert resp.status == 400 and "only 'customer_id'" in resp.json()["error"]


def test_redis_down_is_a_503_for_keyed_requests_only_and_recovers_by_itself(loaded, models, repo, client_for):
    engine = engine_for(loaded, repo)
    client = client_for(engine)
    x = torch.tensor([features_of(9)])
    assert run(client.post("/v2/models/mlp/infer", keyed_body([9]))).status == 200
    repo.redis.stop()
    try:

        async def during():
            return (
                await client.post("/v2/models/mlp/infer", keyed_body([9])),
                await client.post("/v2/models/mlp/infer", keyed_body([9])),  # fails fast: no new attempt
                await client.post("/v2/models/mlp/infer", infer_body(x)),
                await client.get("/v2/health/ready"),
                await client.get("/metrics"),
            )

        t = time.perf_counter()
        first, second, vector, ready, metrics = run(during())
        assert time.perf_counter() - t < 1.0  # the loop was never stuck on the dead store
        for resp in (first, second):
            assert resp.status == 503 and resp.headers[b"retry-after"] == b"1"
            error = resp.json()["error"]
            assert "feature store unavailable" in error and repo.redis.address in error and "'mlp'" in error
            assert "feast-test-secret" not in error
        assert vector.status == 200  # requests carrying their vector are still served
        assert torch.allclose(torch.tensor(vector.json()["outputs"][0]["data"]), models.expected(x)[0], atol=1e-6)
        assert ready.status == 200  # readiness stays up: HAProxy keeps the color for vector traffic
        details = ready.json()["details"]["feature_store"]
        assert details["up"] is False and details["error"] and details["down_since"]
        text = metrics.body.decode()
        assert metric(text, "sovereign_runtime_feature_store_up") == 0
        assert 'result="unavailable"} 2.0' in text
        assert metric(text, "sovereign_runtime_ready") == 1
    finally:
        repo.redis.start()
        repo.materialize()  # no persistence: the restarted Redis is empty until materialized again
    time.sleep(0.35)  # feature_retry_s: the next keyed request tries the store again
    back = run(client.post("/v2/models/mlp/infer", keyed_body([9])))
    assert back.status == 200, back.body
    assert engine.features.up is True
    ready = run(client.get("/v2/health/ready"))
    assert ready.json()["details"]["feature_store"] == {**ready.json()["details"]["feature_store"], "up": True}
    assert "error" not in ready.json()["details"]["feature_store"]


def coalescing_engine(loaded, repo: Repo):
    """Every request joins the fetch coalescer (unknown concurrency, as when a server cannot say), reads counted."""
    engine = engine_for(loaded, repo)
    engine.busy = None
    return engine


def test_concurrent_keyed_requests_share_one_online_read(loaded, models, repo, client_for):
    engine = coalescing_engine(loaded, repo)
    client = client_for(engine)
    groups = [[1], [2], [3, 4], [40], [1]]  # the same entity twice: each request gets its own row

    async def go():
        return await asyncio.gather(*(client.post("/v2/models/mlp/infer", keyed_body(g)) for g in groups))

    answers = run(go())
    assert engine.fetcher.reads == 1  # five requests, one online_read (one Redis pipeline)
    for keys, answer in zip(groups, answers, strict=True):
        assert answer.status == 200, answer.body
        want = models.expected(torch.tensor([features_of(k) for k in keys]))
        assert torch.allclose(torch.tensor(answer.json()["outputs"][0]["data"]).reshape(want.shape), want, atol=1e-6)
    assert engine.waiting == 0
    text = run(client.get("/metrics")).body.decode()
    assert 'result="ok"} 5.0' in text  # counted per request, not per read
    assert metric(text, "sovereign_runtime_feature_fetch_duration_seconds_count") == 5
    assert metric(text, "sovereign_runtime_feature_store_reads_total") == 1


def test_a_coalesced_read_is_bounded_in_keys_and_the_rest_waits_for_the_next(
    loaded, models, repo, client_for, monkeypatch
):
    from sovereign_runtime import features

    monkeypatch.setattr(features, "MAX_READ_KEYS", 3)
    engine = coalescing_engine(loaded, repo)
    client = client_for(engine)
    groups = [[1], [2], [3, 4], [5], [6, 7, 8, 9]]  # reads: [1] [2] | [3, 4] [5] | [6, 7, 8, 9] (one request: whole)

    async def go():
        return await asyncio.gather(*(client.post("/v2/models/mlp/infer", keyed_body(g)) for g in groups))

    answers = run(go())
    assert engine.fetcher.reads == 3
    for keys, answer in zip(groups, answers, strict=True):
        assert answer.status == 200, answer.body
        want = models.expected(torch.tensor([features_of(k) for k in keys]))
        assert torch.allclose(torch.tensor(answer.json()["outputs"][0]["data"]).reshape(want.shape), want, atol=1e-6)


def test_one_unknown_key_fails_only_the_request_that_asked_for_it(loaded, models, repo, client_for):
    engine = coalescing_engine(loaded, repo)
    client = client_for(engine)
    fed = []
    forward = engine.forward
    engine.forward = lambda t: fed.append(t[0].clone()) or forward(t)
    groups = [[5], [6, MISSING], [7], [MISSING + 1]]

    async def go():
        return await asyncio.gather(*(client.post("/v2/models/mlp/infer", keyed_body(g)) for g in groups))

    ok5, bad, ok7, bad2 = run(go())
    assert engine.fetcher.reads == 1
    for keys, answer in (([5], ok5), ([7], ok7)):
        assert answer.status == 200, answer.body
        want = models.expected(torch.tensor([features_of(k) for k in keys]))
        assert torch.allclose(torch.tensor(answer.json()["outputs"][0]["data"]).reshape(want.shape), want, atol=1e-6)
    assert bad.status == 404 and bad2.status == 404
    assert f"customer_id={MISSING}:" in bad.json()["error"] and f"customer_id={MISSING + 1}" not in bad.json()["error"]
    assert "customer_id=6" not in bad.json()["error"]  # its known key is not named as unknown
    other = bad2.json()["error"]
    assert f"customer_id={MISSING + 1}:" in other and f"customer_id={MISSING}:" not in other
    rows = torch.cat(fed)  # only the two good requests' rows reached the model
    assert rows.shape[0] == 2 and torch.equal(rows, torch.tensor([features_of(5), features_of(7)]))
    text = run(client.get("/metrics")).body.decode()
    assert 'result="ok"} 2.0' in text and 'result="unknown_entity"} 2.0' in text
    assert engine.waiting == 0


def test_redis_down_fails_every_coalesced_keyed_request_503_and_serves_the_vectors(loaded, models, repo, client_for):
    engine = coalescing_engine(loaded, repo)
    client = client_for(engine)
    assert run(client.post("/v2/models/mlp/infer", keyed_body([8]))).status == 200  # the client is connected
    reads = engine.fetcher.reads
    x = torch.tensor([features_of(9)])
    repo.redis.stop()
    try:

        async def go():
            keyed = [client.post("/v2/models/mlp/infer", keyed_body(g)) for g in ([1], [2, 3], [4])]
            vectors = [client.post("/v2/models/mlp/infer", infer_body(x)) for _ in range(2)]
            return await asyncio.gather(*keyed, *vectors)

        *keyed, v1, v2 = run(go())
        assert engine.fetcher.reads == reads + 1  # one failed read for the three, not three
        for resp in keyed:
            assert resp.status == 503 and resp.headers[b"retry-after"] == b"1", resp.body
            assert "feature store unavailable" in resp.json()["error"] and repo.redis.address in resp.json()["error"]
        for resp in (v1, v2):
            assert resp.status == 200
            assert torch.allclose(torch.tensor(resp.json()["outputs"][0]["data"]), models.expected(x)[0], atol=1e-6)
        ready = run(client.get("/v2/health/ready"))
        assert ready.status == 200 and ready.json()["details"]["feature_store"]["up"] is False
        text = run(client.get("/metrics")).body.decode()
        assert 'result="unavailable"} 3.0' in text and metric(text, "sovereign_runtime_feature_store_up") == 0
        assert engine.waiting == 0
    finally:
        repo.redis.start()
        repo.materialize()


def test_start_up_checks_the_golden_rows_by_entity_key(loaded, models, repo):
    engine = engine_for(loaded, repo)
    keys = [5, 6]
    x = torch.tensor([features_of(k) for k in keys])
    base = models.golden(x)
    entity = [{"name": "customer_id", "datatype": "INT64", "shape": [2], "data": keys}]
    good = Golden(base["inputs"], base["outputs"], 1e-5, 1e-6, "test", entity)
    assert check_entity_golden(engine, good) == {"entity_golden": "ok"}
    skew = Golden(models.golden(x + 1)["inputs"], base["outputs"], 1e-5, 1e-6, "test", entity)
    report = check_entity_golden(engine, skew)
    assert report["ok"] is False and "differ from the golden input" in report["error"]
    missing = Golden(base["inputs"], base["outputs"], 1e-5, 1e-6, "test", [{**entity[0], "data": [5, MISSING]}])
    report = check_entity_golden(engine, missing)
    assert report["ok"] is False and str(MISSING) in report["error"]
    assert check_entity_golden(engine, replace(good, entity_inputs=None)) == {"entity_golden": "absent"}


def test_unknown_feature_service_or_a_model_that_does_not_fit_is_refused_at_start(loaded, repo):
    engine = make_engine(loaded["mlflow_pt2"], feature_service="nope", feast_repo=str(repo.path))
    with pytest.raises(ModelLoadError, match=r"feature service 'nope' is not in the Feast registry.*'mlp'"):
        attach_features(engine)
    engine = make_engine(loaded["torchscript"], feature_service=SERVICE, feast_repo=str(repo.path))
    engine.model = replace(engine.model, inputs=[replace(engine.model.inputs[0], shape=(-1, 7))])
    with pytest.raises(ModelLoadError, match=r"yields 4 features .*\[-1, 4\]"):
        attach_features(engine)


def test_features_command_asks_the_registry_with_the_env_settings(repo):
    """What a deploy runs before restarting anything (roles/release): the real console entry point, configured by
    the same SOVEREIGN_RUNTIME_* variables as the service."""
    import subprocess

    from conftest import runtime_command, runtime_env

    env = runtime_env(SOVEREIGN_RUNTIME_FEATURE_SERVICE=SERVICE, SOVEREIGN_RUNTIME_FEAST_REPO=str(repo.path))
    ok = subprocess.run([*runtime_command(), "features"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["feature_service"] == SERVICE and doc["entity_key"] == "customer_id"
    assert doc["features"] == ["f0", "f1", "f2", "f3"] and "feast-test-secret" not in ok.stdout
    bad = subprocess.run(
        [*runtime_command(), "features", "--feature-service", "churn"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    error = json.loads(bad.stdout)["error"]
    assert "feature service 'churn' is not in the Feast registry of project 'fftest'" in error and "'mlp'" in error


def test_served_process_passes_the_deploy_smoke_test_by_entity_key(models, repo, tmp_path):
    """A real `sovereign-runtime serve` configured by env (as the role's env files do), its start-up golden check by
    customer_id, then the deploy's smoke_test module: it replays the golden rows by key (check entity_golden)."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, http, runtime_command, runtime_env, stop, wait_until
    from mlflow_testserver import free_port

    model = tmp_path / "model"
    shutil.copytree(models.mlflow_pt2, model)
    golden = json.loads((model / "golden.json").read_text())
    golden["entity_inputs"] = [{"name": "customer_id", "datatype": "INT64", "shape": [3], "data": GOLDEN_KEYS}]
    (model / "golden.json").write_text(json.dumps(golden))
    port = free_port()
    env = runtime_env(
        SOVEREIGN_RUNTIME_MODEL_URI=str(model),
        SOVEREIGN_RUNTIME_MODEL_NAME="mlp",
        SOVEREIGN_RUNTIME_PORT=str(port),
        SOVEREIGN_RUNTIME_FEATURE_SERVICE=SERVICE,
        SOVEREIGN_RUNTIME_FEAST_REPO=str(repo.path),
    )
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([*runtime_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http("GET", f"{url}/v2/health/ready", timeout=2).status == 200, 120, "ready")
        meta = http("GET", f"{url}/v2/models/mlp").json()
        assert meta["parameters"]["feature_service"]["golden_entity_inputs"][0]["data"] == GOLDEN_KEYS
        # The module as Ansible runs it, in its own interpreter (ansible's import-time patches break torch.export
        # in this one): arguments from a JSON file, the result on stdout.
        args = tmp_path / "args.json"
        args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"url": url, "model_name": "mlp", "max_p99_ms": 5000}}))
        module = "ansible_collections.sovereign.mlops.plugins.modules.smoke_test"
        smoke = subprocess.run(
            [sys.executable, "-m", module, str(args)],
            env={**env, "PYTHONPATH": str(ROOT / "collections")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        result = json.loads(smoke.stdout)
        checks = {c["name"]: c for c in result["checks"]}
        assert not result.get("failed"), result
        assert checks["entity_golden"]["passed"] is True, checks["entity_golden"]
        assert "customer_id [101, 102, 103]" in checks["entity_golden"]["detail"]
    finally:
        stop(proc)
        log.close()
    assert (
        '"event": "feature_service_opened"' in (tmp_path / "serve.log").read_text()
        or "feature_service_opened" in (tmp_path / "serve.log").read_text()
    )
