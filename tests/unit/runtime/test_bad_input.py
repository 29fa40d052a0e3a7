"""Bad input gets a 4xx with a JSON error naming the problem: never a 500, never a dead worker.

A table of known mistakes, then hypothesis throwing random bodies, paths and methods at the ASGI app.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import IN, make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def tensor(**over):
    base = {"name": "input__0", "datatype": "FP32", "shape": [1, IN], "data": [0.5] * IN}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


INFER = "/v2/models/mlp/infer"
# (case, method, path, body, status, words the error must contain)
CASES = [
    ("malformed JSON", "POST", INFER, b'{"inputs": [', 400, "not valid JSON"),
    ("not UTF-8", "POST", INFER, b"\xff\xfe\x00", 400, "not valid JSON"),
    ("empty body", "POST", INFER, b"", 400, "not valid JSON"),
    ("JSON array", "POST", INFER, b"[1, 2]", 400, "JSON object"),
    ("no inputs", "POST", INFER, b"{}", 400, "inputs"),
    ("inputs not a list", "POST", INFER, b'{"inputs": {"a": 1}}', 400, "inputs"),
    ("input not an object", "POST", INFER, b'{"inputs": [3]}', 400, "object"),
    ("unknown input name", "POST", INFER, body(tensor(name="x")), 400, "unknown input 'x'"),
    ("missing name", "POST", INFER, body(tensor(name=...)), 400, "name"),
    ("duplicate input", "POST", INFER, body(tensor(), tensor()), 400, "1 input"),
    ("wrong datatype", "POST", INFER, body(tensor(datatype="INT64", data=[1] * IN)), 400, "INT64"),
    ("unknown datatype", "POST", INFER, body(tensor(datatype="FLOAT")), 400, "unknown datatype"),
    ("BYTES datatype", "POST", INFER, body(tensor(datatype="BYTES")), 400, "unsupported datatype"),
    ("wrong rank", "POST", INFER, body(tensor(shape=[IN])), 400, "rank"),
    ("wrong width", "POST", INFER, body(tensor(shape=[1, IN + 1], data=[0.0] * (IN + 1))), 400, "does not match"),
    ("negative dim", "POST", INFER, body(tensor(shape=[-1, IN])), 400, "non-negative"),
    ("shape not a list", "POST", INFER, body(tensor(shape="1x4")), 400, "shape"),
    ("zero batch", "POST", INFER, body(tensor(shape=[0, IN], data=[])), 400, "at least 1"),
    ("data too short", "POST", INFER, body(tensor(data=[0.0] * (IN - 1))), 400, "needs 4"),
    ("data too long", "POST", INFER, body(tensor(data=[0.0] * (IN + 3))), 400, "needs 4"),
    ("huge shape", "POST", INFER, body(tensor(shape=[10**12, IN])), 400, "needs"),
    ("strings in data", "POST", INFER, body(tensor(data=["a"] * IN)), 400, "FP32"),
    ("null in data", "POST", INFER, body(tensor(data=[None] * IN)), 400, "FP32"),
    ("ragged data", "POST", INFER, body(tensor(shape=[2, IN], data=[[0.0] * IN, [0.0]])), 400, "data"),
    ("data not a list", "POST", INFER, body(tensor(data=1.0)), 400, "data"),
    ("id not a string", "POST", INFER, body(tensor(), id=5), 400, "id"),
    ("unknown output", "POST", INFER, body(tensor(), outputs=[{"name": "zzz"}]), 400, "unknown output"),
    ("outputs not a list", "POST", INFER, body(tensor(), outputs="all"), 400, "outputs"),
    ("deep nesting", "POST", INFER, b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ("oversized body", "POST", INFER, b"{" + b" " * 300_000 + b"}", 413, "larger than"),
    ("unknown model", "POST", "/v2/models/other/infer", body(tensor()), 404, "unknown model 'other'"),
    ("unknown version", "POST", "/v2/models/mlp/versions/7/infer", body(tensor()), 404, "unknown version"),
    ("GET on infer", "GET", INFER, b"", 405, "GET not allowed"),
    ("POST on ready", "POST", "/v2/health/ready", b"", 405, "POST not allowed"),
    ("DELETE on metadata", "DELETE", "/v2/models/mlp", b"", 405, "DELETE not allowed"),
    ("unknown path", "GET", "/v1/models/mlp:predict", b"", 404, "unknown path"),
    ("unknown model action", "GET", "/v2/models/mlp/explain", b"", 404, "unknown path"),
]


@pytest.fixture(scope="module")
def client(loaded):
    from conftest import AsgiClient
    from sovereign_runtime.app import App

    return AsgiClient(App(make_engine(loaded["mlflow_pt2"], max_body_bytes=250_000)))


@pytest.mark.parametrize(("case", "method", "path", "payload", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_json(client, case, method, path, payload, status, words):
    resp = asyncio.run(client.request(method, path, payload))
    assert resp.status == status, (case, resp.body)
    assert resp.headers[b"content-type"] == b"application/json"
    error = resp.json()["error"]
    assert words in error, error
    if status == 405:
        assert b"allow" in resp.headers


def test_integer_and_bool_inputs_are_exact(loaded):
    """INT/BOOL tensors refuse floats and out-of-range values instead of truncating them silently."""
    from sovereign_runtime.protocol import Decoder, RequestError, TensorSpec

    dec = Decoder([TensorSpec("i", "INT8", (-1, 2)), TensorSpec("b", "BOOL", (-1, 2))], None, batch_dim=True)
    ok = {"name": "b", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}
    for bad, words in (([1.5, 2], "integers"), ([1, 300], "out of range"), ([1, "2"], "INT8")):
        doc = {"inputs": [{"name": "i", "datatype": "INT8", "shape": [1, 2], "data": bad}, ok]}
        with pytest.raises(RequestError, match=words):
            dec.decode(json.dumps(doc).encode())
    doc = {"inputs": [{"name": "i", "datatype": "INT8", "shape": [1, 2], "data": [1, -2]}, {**ok, "data": [1, 0]}]}
    with pytest.raises(RequestError, match="true/false"):
        dec.decode(json.dumps(doc).encode())


# ------------------------------------------------------------------------------------------------
# Property-based: whatever arrives, the answer is a well-formed JSON 2xx/4xx and the app keeps working.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
DATATYPES = ["FP32", "FP64", "INT64", "INT8", "BOOL", "BYTES", "FP16", "fp32", ""]
datatypes = st.sampled_from(DATATYPES) | st.text(max_size=5)
shapes = st.lists(st.integers(min_value=-3, max_value=6), max_size=4) | json_values
data = st.lists(st.floats(allow_nan=True) | st.integers() | st.booleans(), max_size=30) | json_values
oip_tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input__0", "x", ""]) | st.text(max_size=5),
        "datatype": datatypes,
        "shape": shapes,
        "data": data,
        "parameters": json_values,
    },
)
oip_request = st.fixed_dictionaries(
    {"inputs": st.lists(oip_tensor, max_size=3) | json_values},
    optional={
        "id": json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=9)})) | json_values,
    },
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | oip_request.map(lambda v: json.dumps(v).encode())
)


def check(resp) -> None:
    assert resp.status in (200, 400, 404, 405, 413), (resp.status, resp.body)
    doc = json.loads(resp.body)
    assert isinstance(doc, dict)
    if resp.status != 200:
        assert isinstance(doc["error"], str) and doc["error"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=bodies, batched=st.booleans())
def test_random_bodies_never_500(loaded, payload, batched):
    from conftest import AsgiClient
    from sovereign_runtime.app import App

    engine = _engines(loaded)[batched]
    client = AsgiClient(App(engine))

    async def go():
        resp = await client.post(INFER, payload)
        check(resp)
        ok = await client.post(INFER, body(tensor()))  # and the app still serves
        assert ok.status == 200

    asyncio.run(go())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/v2", "/v2/models/mlp", "/metrics", "/v2/health/live"]).flatmap(
        lambda prefix: st.text(alphabet="/abcmlpv2.%-_infer", max_size=20).map(lambda tail: prefix + tail)
    ),
    payload=st.binary(max_size=64),
)
def test_random_paths_and_methods_never_500(loaded, method, path, payload):
    from conftest import AsgiClient
    from sovereign_runtime.app import App

    client = AsgiClient(App(_engines(loaded)[True]))
    resp = asyncio.run(client.request(method, path, payload))
    assert resp.status in (200, 400, 404, 405, 413), (method, path, resp.status)
    if path != "/metrics" and method != "HEAD":
        assert isinstance(json.loads(resp.body), dict)


_ENGINES: dict = {}


def _engines(loaded):
    if not _ENGINES:
        _ENGINES[True] = make_engine(loaded["mlflow_pt2"], max_batch_size=8, max_body_bytes=4096)
        _ENGINES[False] = make_engine(loaded["mlflow_pt2"], max_batch_size=1, max_body_bytes=4096)
    return _ENGINES


def test_streamed_body_limits(loaded):
    """Without a content-length the limit is enforced while reading; within it, a chunked body works."""
    from conftest import AsgiClient
    from sovereign_runtime.app import App

    client = AsgiClient(App(make_engine(loaded["mlflow_pt2"], max_body_bytes=1000)))
    big = body(tensor(data=[0.123456789] * IN), id="x" * 2000)

    async def go():
        too_big = await client.request("POST", INFER, big, chunks=7)
        return too_big, await client.request("POST", INFER, body(tensor()), chunks=3)

    too_big, ok = asyncio.run(go())
    assert too_big.status == 413 and "larger than 1000" in too_big.json()["error"]
    assert ok.status == 200
