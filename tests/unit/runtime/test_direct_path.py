"""The HTTP direct path (ADR 1715): an infer request read whole by httpproto.Protocol skips ASGI (no scope,
cycle or task) and is answered with the same bytes the ASGI path sends. Driven in-process on uvicorn's real
protocol class with a transport that records what would go on the wire (the double: no socket), against a
real model and engine; the same requests forced through the ASGI path are the reference."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time

import pytest
import torch
import uvicorn
from conftest import IN, RecordingTransport, infer_body, make_engine
from sovereign_runtime.app import App
from sovereign_runtime.httpproto import Protocol
from uvicorn.server import ServerState

URL = "/v2/models/mlp/infer"


class Wire:
    """One server (App + Protocol) and its connections, on the running loop."""

    def __init__(self, engine, direct: bool = True) -> None:
        self.app = App(engine)
        if not direct:
            self.app.takes_direct = lambda url: False  # the reference: every request through ASGI
        self.config = uvicorn.Config(
            self.app,
            http=Protocol,
            lifespan="off",
            server_header=False,
            date_header=False,
            access_log=False,
            log_config=None,
            proxy_headers=False,
        )
        self.config.load()
        self.state = ServerState()
        self.max_tasks = 0

    def connect(self) -> tuple[Protocol, RecordingTransport]:
        proto = Protocol(config=self.config, server_state=self.state, app_state={})
        transport = RecordingTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        return proto, transport

    async def settle(self, transports: list[RecordingTransport], answers: int) -> None:
        """Run the loop until the transports hold ``answers`` writes in all (every answer is one write)."""
        for _ in range(2000):
            self.max_tasks = max(self.max_tasks, len(self.state.tasks))
            if sum(len(t.writes) for t in transports) >= answers and not self.state.tasks:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"not answered: {[t.writes for t in transports]}")


def request(body: bytes, url: str = URL, headers: str = "", version: str = "1.1") -> bytes:
    head = f"POST {url} HTTP/{version}\r\nHost: t\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def binary_request(x: torch.Tensor, binary_out: bool = True) -> bytes:
    raw = struct.pack(f"<{x.numel()}f", *x.reshape(-1).tolist())
    doc = {"inputs": [{"name": "input__0", "shape": list(x.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": len(raw)}}]}  # fmt: skip
    if binary_out:
        doc["outputs"] = [{"name": "output__0", "parameters": {"binary_data": True}}]
    head = json.dumps(doc).encode()
    return request(head + raw, headers=f"Inference-Header-Content-Length: {len(head)}\r\n")


def normalised(answer: bytes) -> bytes:
    """Every answer has its own server-made request id (request_id.py): the same placeholder in both, and
    the content-length checked here, not compared (ids differ in length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"\r\ncontent-length: {len(body)}\r\n".encode() in head + b"\r\n", answer
    return re.sub(rb"[0-9a-f]{12}-[0-9]+", b"<id>", re.sub(rb"content-length: [0-9]+", b"content-length: N", answer))


def answers(engine, raw: list[bytes], direct: bool) -> tuple[list[bytes], Wire]:
    async def run() -> tuple[list[bytes], Wire]:
        wire = Wire(engine, direct)
        out = []
        for data in raw:  # one connection each: a 4xx must not decide the next one's fate
            proto, transport = wire.connect()
            proto.data_received(data)
            await wire.settle([transport], 1)
            out.extend(transport.writes)
        return out, wire

    return asyncio.run(run())


@pytest.fixture(scope="module")
def engine(loaded):
    return make_engine(loaded["mlflow_pt2"], model_name="mlp")


def cases() -> list[bytes]:
    x = torch.linspace(-1, 1, 3 * IN).reshape(3, IN)
    return [
        request(infer_body(x)),
        request(infer_body(x[:1], id="client-7")),
        request(infer_body(x, outputs=[{"name": "output__0"}])),
        request(infer_body(x, outputs=[{"name": "nope"}])),
        request(b"{not json"),
        request(b""),
        request(
            json.dumps(
                {"inputs": [{"name": "input__0", "shape": [1, IN + 1], "datatype": "FP32", "data": [0.0] * (IN + 1)}]}
            ).encode()
        ),
        request(
            json.dumps(
                {"inputs": [{"name": "input__0", "shape": [1, IN], "datatype": "FP32", "data": [float("nan")] * IN}]}
            ).encode()
        ),
        request(infer_body(x), url="/v2/models/mlp/versions/1/infer"),
        binary_request(x),
        binary_request(x, binary_out=False),
        request(infer_body(x), headers="Connection: close\r\n"),
        request(infer_body(x), version="1.0"),
    ]


def test_direct_answers_are_the_asgi_answers_byte_for_byte(engine):
    raw = cases()
    slow, slow_wire = answers(engine, raw, direct=False)
    fast, fast_wire = answers(engine, raw, direct=True)
    assert slow_wire.max_tasks >= 1 and fast_wire.max_tasks == 0  # ASGI made tasks; the direct path none
    assert len(slow) == len(fast) == len(raw)
    statuses = [a.split(b" ", 2)[1] for a in fast]
    assert statuses.count(b"200") == 9 and statuses.count(b"400") == 4, statuses
    for want, got in zip(slow, fast, strict=True):
        assert normalised(got) == normalised(want)


def test_direct_answers_count_in_the_metrics_and_reach_the_experiment_hook(engine):
    async def run() -> tuple[list, bytes]:
        wire = Wire(engine)
        seen = []
        wire.app.on_infer = lambda headers, status, latency: seen.append((headers, status, latency))
        before = dict(engine.metrics.requests)
        latencies = engine.metrics.request_latency.counts[:]
        proto, transport = wire.connect()
        proto.data_received(request(infer_body(torch.ones(2, IN))) + request(b"[]"))
        await wire.settle([transport], 2)
        after = engine.metrics.requests
        assert after.get(("infer", 200), 0) - before.get(("infer", 200), 0) == 1
        assert after.get(("infer", 400), 0) - before.get(("infer", 400), 0) == 1
        assert sum(engine.metrics.request_latency.counts) - sum(latencies) == 2
        return seen, transport.writes[0]

    seen, first = asyncio.run(run())
    assert [s[1] for s in seen] == [200, 400]
    rid = json.loads(first.partition(b"\r\n\r\n")[2])["id"]
    assert seen[0][0] == [(b"x-request-id", rid.encode())] and seen[0][2] > 0
    assert f"x-request-id: {rid}\r\n".encode() in first


def test_pipelined_requests_are_answered_in_order(engine):
    """Three requests in one segment: the first takes the direct path; the ones behind it wait for its
    answer in uvicorn's pipeline, as without the direct path."""
    bodies = [infer_body(torch.full((1, IN), float(i)), id=f"r{i}") for i in range(3)]

    async def run() -> list[bytes]:
        wire = Wire(engine)
        proto, transport = wire.connect()
        proto.data_received(b"".join(request(b) for b in bodies))
        await wire.settle([transport], 3)
        return transport.writes

    writes = asyncio.run(run())
    assert [json.loads(w.partition(b"\r\n\r\n")[2])["id"] for w in writes] == ["r0", "r1", "r2"]


def test_concurrent_direct_requests_share_one_forward(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", max_batch_delay_ms=0)
    xs = [torch.full((1, IN), i / 10) for i in range(16)]

    async def run() -> list[RecordingTransport]:
        wire = Wire(engine)
        conns = [wire.connect() for _ in xs]
        forwards = engine.metrics.batch_size.total, sum(engine.metrics.batch_size.counts)
        for (proto, _), x in zip(conns, xs, strict=True):  # as one poll of the loop delivers them
            proto.data_received(request(infer_body(x)))
        await wire.settle([t for _, t in conns], len(xs))
        rows = engine.metrics.batch_size.total - forwards[0]
        assert (rows, sum(engine.metrics.batch_size.counts) - forwards[1]) == (16, 1)  # 16 rows, one forward
        return [t for _, t in conns]

    for x, transport in zip(xs, asyncio.run(run()), strict=True):
        out = json.loads(transport.writes[0].partition(b"\r\n\r\n")[2])["outputs"][0]
        assert torch.allclose(torch.tensor(out["data"]), engine.forward([x])[0].reshape(-1), atol=1e-6)


def test_concurrent_binary_requests_share_one_forward_and_get_their_own_rows(loaded):
    """Binary answers from a batch are cut from the batch's raw bytes (protocol.BinaryEncoder): each client
    gets its own rows, whatever its row count, and one that asked for JSON output gets JSON."""
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", max_batch_delay_ms=0)
    xs = [torch.linspace(-1, 1, IN * (1 + i % 2)).reshape(1 + i % 2, IN) * (i + 1) for i in range(10)]  # 15 rows

    async def run() -> list[RecordingTransport]:
        wire = Wire(engine)
        conns = [wire.connect() for _ in xs]
        forwards = sum(engine.metrics.batch_size.counts)
        for i, ((proto, _), x) in enumerate(zip(conns, xs, strict=True)):
            proto.data_received(binary_request(x, binary_out=i != 5))
        await wire.settle([t for _, t in conns], len(xs))
        assert sum(engine.metrics.batch_size.counts) - forwards == 1
        return [t for _, t in conns]

    for i, (x, transport) in enumerate(zip(xs, asyncio.run(run()), strict=True)):
        head, _, body = transport.writes[0].partition(b"\r\n\r\n")
        want = engine.forward([x])[0]
        if i == 5:
            got = torch.tensor(json.loads(body)["outputs"][0]["data"]).reshape(want.shape)
        else:
            n = int(re.search(rb"inference-header-content-length: ([0-9]+)", head).group(1))
            out = json.loads(body[:n])["outputs"][0]
            assert out["shape"] == list(want.shape) and out["parameters"]["binary_data_size"] == want.numel() * 4
            got = torch.frombuffer(bytearray(body[n:]), dtype=torch.float32).reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-5), i


def test_connection_close_and_shutdown_close_after_the_answer(engine):
    async def run() -> tuple[RecordingTransport, RecordingTransport]:
        wire = Wire(engine)
        proto, closing = wire.connect()
        proto.data_received(request(infer_body(torch.ones(1, IN)), headers="Connection: close\r\n"))
        await wire.settle([closing], 1)
        proto2, draining = wire.connect()
        proto2.data_received(request(infer_body(torch.ones(1, IN))))
        proto2.shutdown()  # the server stops while the request waits for its batch
        await wire.settle([draining], 1)
        return closing, draining

    for transport in asyncio.run(run()):
        assert transport.closed and len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nconnection: close\r\n" in transport.writes[0]


def test_a_client_gone_before_its_answer_gets_no_write(engine):
    async def run() -> RecordingTransport:
        wire = Wire(engine)
        proto, transport = wire.connect()
        proto.data_received(request(infer_body(torch.ones(1, IN))))
        transport.closed = True
        proto.connection_lost(None)
        for _ in range(20):
            await asyncio.sleep(0)
        assert engine.in_flight == 0
        return transport

    assert asyncio.run(run()).writes == []


@pytest.mark.parametrize(
    "data",
    [
        request(infer_body(torch.ones(1, IN)), url=URL + "?x=1"),  # a query string
        request(infer_body(torch.ones(1, IN)), url="/v2/models/ml%70/infer"),  # percent-encoded
        request(infer_body(torch.ones(1, IN)), headers="Expect: 100-continue\r\n"),
        b"POST "
        + URL.encode()
        + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(infer_body(torch.ones(1, IN)))
        + infer_body(torch.ones(1, IN))
        + b"\r\n0\r\n\r\n",
    ],
    ids=["query", "percent", "expect", "chunked"],
)
def test_other_requests_take_the_asgi_path(engine, data):
    async def run() -> tuple[list[bytes], int]:
        wire = Wire(engine)
        proto, transport = wire.connect()
        proto.data_received(data)
        await wire.settle([transport], 1)
        return transport.writes, wire.max_tasks

    writes, tasks = asyncio.run(run())
    assert tasks == 1 and writes[-1].split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"


def test_an_oversized_body_gets_the_asgi_413(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", max_body_bytes=1000)

    async def run() -> list[bytes]:
        wire = Wire(engine)
        proto, transport = wire.connect()
        proto.data_received(request(b"{" + b" " * 2000 + b"}"))
        await wire.settle([transport], 1)
        return transport.writes

    assert asyncio.run(run())[0].startswith(b"HTTP/1.1 413 ")


def test_a_wrapped_infer_takes_the_asgi_path(loaded):
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", chaos_error_rate=1.0)

    async def run() -> tuple[list[bytes], int]:
        wire = Wire(engine)
        proto, transport = wire.connect()
        proto.data_received(request(infer_body(torch.ones(1, IN))))
        await wire.settle([transport], 1)
        return transport.writes, wire.max_tasks

    writes, tasks = asyncio.run(run())
    assert tasks == 1 and writes[0].startswith(b"HTTP/1.1 500 ")


def test_a_bug_answering_is_a_500_and_a_close(engine, monkeypatch):
    def broken(*args):
        raise RuntimeError("bug")

    async def run() -> RecordingTransport:
        wire = Wire(engine)
        monkeypatch.setattr(engine, "submit", broken)
        proto, transport = wire.connect()
        proto.data_received(request(infer_body(torch.ones(1, IN))))
        await wire.settle([transport], 1)
        return transport

    transport = asyncio.run(run())
    assert transport.writes[0].startswith(b"HTTP/1.1 500 ") and transport.closed
    assert engine.in_flight == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_a_batchs_rows_encode_as_the_split_tensors_do(dtype):
    """Engine answers a batched request from lists made once per batch (_BatchOutputs): the same outputs as
    encoding its own slice of every output tensor, for one and several rows and outputs of any rank."""
    from sovereign_runtime.engine import _BatchOutputs, _Rows
    from sovereign_runtime.protocol import TensorSpec, encode_outputs

    outs = [(torch.arange(6 * 3 * 2).reshape(6, 3, 2) % 3).to(dtype), torch.arange(6).to(dtype)]
    specs = [TensorSpec("a", "", None), TensorSpec("b", "", None)]
    shared = _BatchOutputs(outs)
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        rows = _Rows(shared, start, stop)
        for wanted in (None, ["b"]):
            want = encode_outputs(specs, [o[start:stop] for o in outs], wanted)
            assert rows.encode(specs, wanted) == want
        assert all(torch.equal(a, o[start:stop]) for a, o in zip(rows.tensors(), outs, strict=True))


@pytest.mark.parametrize("delay_ms", [0.0, 1.0])
def test_after_a_slow_inline_forward_the_next_client_is_not_alone(loaded, delay_ms):
    """A model whose forward is slower than the 1 ms lone-client window (the heavy MLP: ~3 ms): client a's request
    runs inline; client b's, parsed when that forward ends, sees a's request as recent, so it joins the queue
    (the batch its neighbours join) instead of running inline too. Before, with delay 0, only a batched forward
    widened the window: every request looked alone and a slow model never batched (bench.py, heavy, c=16, d0:
    1.0 rows per forward)."""
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", max_batch_delay_ms=delay_ms)
    sent: dict[str, float] = {}  # each client's last request, as httpproto.Protocol.last_request keeps it
    engine.clients = lambda since: sum(t >= since for t in sent.values())
    compute = engine._compute

    def slow(tensors):
        time.sleep(0.005)
        return compute(tensors)

    engine._compute = slow
    answered: list[str] = []
    body = infer_body(torch.ones(1, IN))

    async def run() -> list[str]:
        for client in ("a", "b"):
            sent[client] = now = time.perf_counter()
            engine.submit(body, None, now, lambda status, _body, _headers, c=client: answered.append(f"{c} {status}"))
        at_once = list(answered)
        await asyncio.sleep(0.1)
        return at_once

    assert asyncio.run(run()) == ["a 200"]  # a inline; b queued
    assert answered == ["a 200", "b 200"]


@pytest.mark.parametrize(("clients", "inline"), [(1, True), (2, False)])
def test_a_lone_client_runs_inline(engine, clients, inline):
    """With batching on, a direct request of the only active client is answered inside data_received (no
    batch hop); with another client active it joins the queue and is answered by the flush."""

    async def run() -> tuple[int, int]:
        wire = Wire(engine)
        engine.clients = lambda since: clients
        try:
            proto, transport = wire.connect()
            proto.data_received(request(infer_body(torch.ones(1, IN))))
            at_once = len(transport.writes)
            await wire.settle([transport], 1)
            return at_once, len(transport.writes)
        finally:
            engine.clients = None

    assert asyncio.run(run()) == ((1, 1) if inline else (0, 1))
