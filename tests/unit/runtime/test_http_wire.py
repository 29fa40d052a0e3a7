"""What the server puts on the wire (ADR 1702), against the real `sovereign-runtime serve` process: a 413
that reaches clients which write their whole body before reading (urllib, requests), and one socket write
per response (checked in-process on uvicorn's real protocol with a transport that records writes: the
number of write calls is not observable from a client)."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPConnection

import pytest
import requests
import torch
import uvicorn
from conftest import (
    IN,
    AsgiClient,
    RecordingTransport,
    http,
    infer_body,
    make_engine,
    runtime_command,
    runtime_env,
    stop,
    wait_until,
)
from mlflow_testserver import free_port
from sovereign_runtime.app import App
from sovereign_runtime.httpproto import Protocol
from uvicorn.server import ServerState

LIMIT = 100_000


@pytest.fixture(scope="module")
def server(models) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*runtime_command(), "serve", "--model-uri", str(models.mlflow_pt2), "--model-name", "mlp"]
    cmd += ["--port", str(port), "--max-body-bytes", str(LIMIT)]
    proc = subprocess.Popen(cmd, env=runtime_env(), stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=2).status == 200, 90, "ready")
        yield base
    finally:
        stop(proc)


def oversized(n: int) -> bytes:
    return b"{" + b" " * n + b"}"


@pytest.mark.parametrize("size", [2 * LIMIT, 2_000_000, 20_000_000])
def test_urllib_sees_the_413(server, size):
    """urllib sends `Connection: close` and writes the whole body before it reads: the server must not
    close (and so reset) while the body is still coming."""
    req = urllib.request.Request(f"{server}/v2/models/mlp/infer", data=oversized(size), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413
    assert json.loads(err.value.read()) == {"error": f"request body larger than {LIMIT} bytes"}


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
def test_requests_sees_the_413_and_the_connection_goes_on(server, connection):
    with requests.Session() as s:
        r = s.post(f"{server}/v2/models/mlp/infer", data=oversized(5_000_000), headers={"Connection": connection})
        assert r.status_code == 413 and "larger than" in r.json()["error"]
        ok = s.post(f"{server}/v2/models/mlp/infer", data=infer_body(torch.ones(1, IN)))
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 2]


def test_head_and_get_answers_are_whole(server):
    conn = HTTPConnection(server.removeprefix("http://"), timeout=10)
    for method in ("HEAD", "GET", "HEAD"):  # one keep-alive connection: HEAD takes uvicorn's own path
        conn.request(method, "/v2/health/live")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and resp.getheader("content-length") == str(len(b'{"live":true}'))
        assert body == (b"" if method == "HEAD" else b'{"live":true}')
    conn.close()


def test_one_write_per_response(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    body = infer_body(torch.ones(1, IN))
    want = json.loads(asyncio.run(AsgiClient(App(engine)).post("/v2/models/mlp/infer", body)).body)
    want.pop("id")  # every answer has its own request id (request_id.py)

    async def run() -> RecordingTransport:
        config = uvicorn.Config(App(engine), http=Protocol, lifespan="off", server_header=False, date_header=False)
        config.load()
        transport = RecordingTransport()
        proto = Protocol(config=config, server_state=ServerState(), app_state={})
        proto.connection_made(transport)  # type: ignore[arg-type]
        head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        for _ in range(3):
            proto.data_received(head + body)
            for _ in range(50):
                await asyncio.sleep(0)
        proto.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert len(transport.writes) == 3, transport.writes
    for w in transport.writes:
        head, _, answer = w.partition(b"\r\n\r\n")
        got = json.loads(answer)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and got.pop("id") and got == want, w


# --------------------------------------------------------------------------------------------------
# The binary tensor extension (Triton's), as tritonclient speaks it


def _triton(server: str):
    import tritonclient.http as triton

    return triton, triton.InferenceServerClient(server.removeprefix("http://"))


def _expected(models, x: torch.Tensor) -> list[list[float]]:
    return models.expected(x).tolist()


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (True, False), (False, True), (False, False)])
def test_tritonclient_infers(server, models, binary_in, binary_out):
    np = pytest.importorskip("numpy")
    triton, client = _triton(server)
    x = torch.arange(3 * IN, dtype=torch.float32).reshape(3, IN) / 10
    inp = triton.InferInput("input__0", [3, IN], "FP32")
    inp.set_data_from_numpy(x.numpy(), binary_data=binary_in)
    out = triton.InferRequestedOutput("output__0", binary_data=binary_out)
    result = client.infer("mlp", [inp], outputs=[out], request_id="r1")
    got = result.as_numpy("output__0")
    assert got.dtype == np.float32 and got.shape == (3, 2)
    assert np.allclose(got, np.array(_expected(models, x), dtype=np.float32), rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "r1"
    raw = result.get_output("output__0")
    assert ("binary_data_size" in raw.get("parameters", {})) is binary_out


def test_tritonclient_without_outputs_gets_every_output_binary(server, models):
    """tritonclient naming no outputs asks for ``binary_data_output``: every output comes back raw."""
    triton, client = _triton(server)
    x = torch.ones(2, IN)
    inp = triton.InferInput("input__0", [2, IN], "FP32")
    inp.set_data_from_numpy(x.numpy())
    result = client.infer("mlp", [inp])
    assert result.get_output("output__0")["parameters"] == {"binary_data_size": 2 * 2 * 4}
    assert torch.allclose(torch.from_numpy(result.as_numpy("output__0").copy()), models.expected(x), atol=1e-6)


def _binary_request(header: dict, raw: bytes, length: int | None = None) -> tuple[bytes, list]:
    head = json.dumps(header).encode()
    return head + raw, [(b"inference-header-content-length", str(len(head) if length is None else length).encode())]


def _fp32_input(rows: int, size: int | None = None) -> dict:
    return {
        "name": "input__0",
        "datatype": "FP32",
        "shape": [rows, IN],
        "parameters": {"binary_data_size": rows * IN * 4 if size is None else size},
    }


BINARY_CASES = [
    ("header length not a number", {"inputs": [_fp32_input(1)]}, 16, "x", "Inference-Header-Content-Length"),
    ("header length past the body", {"inputs": [_fp32_input(1)]}, 16, 10**6, "Inference-Header-Content-Length"),
    ("size not the shape's", {"inputs": [_fp32_input(1, size=12)]}, 12, None, "needs 16 bytes"),
    ("size past the body", {"inputs": [_fp32_input(2)]}, 16, None, "past the end"),
    ("bytes left over", {"inputs": [_fp32_input(1)]}, 20, None, "add up to 16"),
    ("header not JSON", None, 16, None, "not valid JSON"),
]


@pytest.mark.parametrize(("case", "header", "nraw", "length", "words"), BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
def test_bad_binary_requests_get_400(loaded, case, header, nraw, length, words):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    raw = bytes(nraw)
    if header is None:
        body, headers = b"{not json" + raw, [(b"inference-header-content-length", b"9")]
    else:
        body, headers = _binary_request(header, raw, length)
    resp = asyncio.run(AsgiClient(App(engine)).request("POST", "/v2/models/mlp/infer", body, headers))
    assert resp.status == 400, resp.body
    assert words in resp.json()["error"]


def test_binary_data_size_without_the_header_is_explained(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    body = json.dumps({"inputs": [_fp32_input(1)]}).encode()
    resp = asyncio.run(AsgiClient(App(engine)).post("/v2/models/mlp/infer", body))
    assert resp.status == 400 and "Inference-Header-Content-Length" in resp.json()["error"]


def test_hand_built_binary_request_by_the_spec(loaded, models):
    """Without tritonclient: a JSON header, raw little-endian FP32 after it, binary output by request
    parameter; the response's JSON header is Inference-Header-Content-Length bytes long, raw output after."""
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    x = torch.linspace(-1, 1, 2 * IN).reshape(2, IN)
    raw = struct.pack(f"<{2 * IN}f", *x.reshape(-1).tolist())
    body, headers = _binary_request(
        {"id": "b", "inputs": [_fp32_input(2)], "parameters": {"binary_data_output": True}}, raw
    )
    resp = asyncio.run(AsgiClient(App(engine)).request("POST", "/v2/models/mlp/infer", body, headers))
    assert resp.status == 200 and resp.headers[b"content-type"] == b"application/octet-stream"
    n = int(resp.headers[b"inference-header-content-length"])
    doc = json.loads(resp.body[:n])
    assert doc["id"] == "b" and doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert "data" not in doc["outputs"][0]
    out = torch.frombuffer(bytearray(resp.body[n:]), dtype=torch.float32).reshape(2, 2)
    assert torch.allclose(out, models.expected(x), atol=1e-6)
