"""The runtime's own per-request CPU cost, in process: App + Engine answering one OIP infer request, no
sockets and no load generator (bench.py measures those). CPU time (``process_time``) per request, best of
7 blocks of 5,000, for the inline path (a lone request) and the batching hop (queued, one-request
batches). CPU time and best-of-blocks make it far less sensitive to other tenants than bench.py's
latencies, which is what a before/after comparison of the server's code needs on a shared machine.

    python benchmarks/runtime/hotpath.py                                  # this checkout
    python benchmarks/runtime/hotpath.py --src /tmp/old/runtime/src --src runtime/src --rounds 2

Each ``--src`` is a runtime source tree (e.g. ``git archive`` of an older commit); they are measured in
interleaved rounds on the same model (bench.py's MLP 64->256->256->10, torch.export).

The ``http`` figures add the HTTP layer: the server's own protocol class (httpproto.Protocol, uvicorn's
httptools protocol before it existed) on in-memory transports, fed whole requests, on C connections at
once (``http1`` = 1, ``http16`` = 16: a round is one request on each, answered before the next round):
everything the server process does for a request except the kernel's socket work and epoll.
``bin`` = the binary tensor extension (raw FP32 input, binary output; ab.py's ``@binary``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def measure(model_dir: str) -> dict[str, float]:
    import warnings

    warnings.simplefilter("ignore")
    import gc

    import torch
    from sovereign_runtime.app import App
    from sovereign_runtime.config import Settings
    from sovereign_runtime.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(Settings(model_uri=model_dir, model_name="m"))
    try:
        from sovereign_runtime.startup import prepare
    except ImportError:  # runtime trees before startup.py existed
        report = engine.prepare()
    else:
        report = prepare(engine)
    assert report["ok"], report
    engine.set_ready()
    app = App(engine)
    golden = json.loads((Path(model_dir) / "golden.json").read_text())
    first = golden["inputs"][0]
    width = first["shape"][1]
    row = {**first, "shape": [1, width], "data": first["data"][:width]}
    body = json.dumps({"inputs": [row]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer"}
    scope["headers"] = [(b"content-length", str(len(body)).encode())]
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: set[int] = set()

    async def receive() -> dict:
        return message

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            statuses.add(msg["status"])

    async def block(n: int) -> None:
        for _ in range(n):
            await app(scope, receive, send)

    bin_body, bin_len = binary_body(first["data"][:width], width)
    bin_scope = {**scope, "headers": [(b"content-length", str(len(bin_body)).encode()),
                                      (b"inference-header-content-length", str(bin_len).encode())]}  # fmt: skip
    bin_message = {"type": "http.request", "body": bin_body, "more_body": False}

    async def bin_receive() -> dict:
        return bin_message

    async def bin_block(n: int) -> None:
        for _ in range(n):
            await app(bin_scope, bin_receive, send)

    async def best_of(fn, n: int) -> float:
        await fn(n // 2)
        best = float("inf")
        for _ in range(7):
            t = time.process_time()
            await fn(n)
            best = min(best, (time.process_time() - t) / n)
        return round(best * 1e6, 1)

    async def run() -> dict[str, float]:
        out = {}
        for mode, busy in (("inline_us", lambda: 1), ("queued_us", None)):
            engine.busy = busy  # 1 = alone (inline); None = unknown (always through the batch queue)
            out[mode] = await best_of(block, 4000)
        engine.busy = lambda: 1
        out["inline_bin_us"] = await best_of(bin_block, 4000)
        for conns in (1, 16):
            for label, req in (("", http_request(body, None)), ("_bin", http_request(bin_body, bin_len))):
                wire = Wire(app, engine, conns, req)
                out[f"http{conns}{label}_us"] = await best_of(wire.rounds, 4000 // conns) / conns
                assert wire.ok, wire.bad[:300]
        return out

    gc.collect()
    gc.freeze()  # as the server does once ready
    result = asyncio.run(run())
    assert statuses == {200}, statuses
    return result


def binary_body(data: list, width: int) -> tuple[bytes, int]:
    """ab.py's binary request: JSON header + one raw little-endian FP32 row, binary output."""
    import struct

    raw = struct.pack(f"<{width}f", *data)
    inp = {"name": "input__0", "shape": [1, width], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [inp], "outputs": [{"name": "output__0", "parameters": {"binary_data": True}}]})
    return head.encode() + raw, len(head)


def http_request(body: bytes, header_len: int | None) -> bytes:
    extra = f"Inference-Header-Content-Length: {header_len}\r\n" if header_len is not None else ""
    ctype = "application/octet-stream" if header_len is not None else "application/json"
    head = f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{extra}"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Wire:
    """``conns`` connections of the server's HTTP protocol class on in-memory transports."""

    def __init__(self, app, engine, conns: int, request: bytes) -> None:
        import uvicorn
        from uvicorn.server import ServerState

        try:
            from sovereign_runtime.httpproto import Protocol
        except ImportError:  # runtime trees before httpproto.py
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Protocol
        config = uvicorn.Config(
            app, http=Protocol, lifespan="off", access_log=False, log_config=None, proxy_headers=False
        )  # as server.py
        config.load()
        state = ServerState()
        tasks = state.tasks
        engine.busy = tasks.__len__  # as server.py wires it
        if hasattr(engine, "clients"):
            connections = state.connections

            def clients(since: float) -> int:
                return sum(1 for c in connections if getattr(c, "last_request", 0.0) >= since)

            engine.clients = clients
        self.request = request
        self.ok = True
        self.bad = b""
        self.pending = 0
        self.done: asyncio.Future | None = None
        self.protos = []
        for i in range(conns):
            proto = Protocol(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
            proto.connection_made(_Transport(self, i))
            self.protos.append(proto)

    def answered(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            self.ok = False
            self.bad = data
        self.pending -= 1
        if self.pending == 0 and self.done is not None:
            self.done.set_result(None)

    async def rounds(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        request = self.request
        for _ in range(n):
            self.pending = len(self.protos)
            self.done = loop.create_future()
            for proto in self.protos:
                proto.data_received(request)
            await self.done


class _Transport:
    """Just enough of an asyncio transport for uvicorn's protocol: every write is one whole response."""

    def __init__(self, wire: Wire, i: int) -> None:
        self.wire = wire
        self.extra = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000 + i)}

    def get_extra_info(self, name: str, default=None):
        return self.extra.get(name, default)

    buf = b""

    def write(self, data: bytes) -> None:  # older trees write the head and the body apart
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        length = int(buf.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        if len(buf) < end + 4 + length:
            self.buf = buf
            return
        self.buf = b""
        self.wire.answered(buf)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.wire.ok = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", help="runtime source tree (default: this checkout's runtime/src)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    sys.path.insert(0, str(HERE))
    from bench import build_model

    sources = [str(Path(s).resolve()) for s in (args.src or [ROOT / "runtime" / "src"])]
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        model_dir, _, _ = build_model(Path(tmp), "light")
        for r in range(1, args.rounds + 1):
            for src in sources:
                env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
                cmd = [sys.executable, __file__, "--measure", str(model_dir)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                load = os.getloadavg()[0]
                figures = "  ".join(f"{k[:-3]} {v:.1f}" for k, v in res.items())
                print(f"round {r}  {src}  {figures}  (us CPU/request)  load {load:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
