"""What the server puts on the wire (ADR 1702), against the real `sovereign-runtime serve` process: a 413
that reaches clients which write their whole body before reading (urllib, requests), and one socket write
per response (checked in-process on uvicorn's real protocol with a transport that records writes: the
number of write calls is not observable from a client)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPConnection

import pytest
import requests
import torch
import uvicorn
from conftest import IN, AsgiClient, http, infer_body, make_engine, runtime_command, runtime_env, stop, wait_until
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


class RecordingTransport:
    """A double of uvloop's TCP transport that records write calls (the only thing these tests look at)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args, **kwargs) -> None:
        pass


def test_one_write_per_response(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    body = infer_body(torch.ones(1, IN))
    want = asyncio.run(AsgiClient(App(engine)).post("/v2/models/mlp/infer", body)).body

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
        assert w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b"\r\n\r\n" + want)
