"""The serving core, independent of HTTP: readiness state, admission, dynamic batching, forward, encoding.

Execution model (see docs/adr/0101-runtime-serving-design.md):

* Everything on the hot path runs on the event loop thread, the forward pass included, while forwards are
  short: handing a ~20 us forward to a worker thread costs more (GIL hand-offs, wake-ups) than it saves.
* Batches of a model whose last forward took at least ``OFFLOAD_SECONDS`` (a heavy model, a GPU) run on the
  engine's one forward thread (ADR 1716), one at a time: the loop goes on reading and parsing (and accepting
  gRPC calls) meanwhile, and what arrives during a forward joins the queue and forms the next batch. A lone
  HTTP request still runs inline (no hop); a gRPC call always joins the queue then, because grpcio accepts
  one call per loop round trip and every call would look alone (``run(..., alone_inline=False)``).
* Batching off (``max_batch_size`` 0 or 1): each request runs its forward inline, in its handler.
* Batching on, and the request is alone (no other request parsed, nothing queued): inline, exactly as
  with batching off. Otherwise it joins a queue and a flush is scheduled with ``call_soon``; the flush
  runs after every request already parsed in this loop iteration has joined, so requests that arrive
  together share one forward. The optional ``max_batch_delay_ms`` wait applies only when the previous
  batch held more than one request (there is concurrency); a lone client never waits for a batch.
* Admission is bounded: more than ``max_queue_size`` admitted, unanswered-for requests -> 503 with
  Retry-After. A request still waiting for compute after ``request_timeout_s`` -> 504 (a forward in
  progress is not interrupted).

Not here: loading, warm-up and the golden check (startup.py, once per process), and the chaos knobs
(chaos.py wraps ``infer`` only when a chaos flag is set: the production path has no chaos branch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__
from .config import Settings
from .logs import log_event
from .metrics import Metrics
from .model import LoadedModel, cuda_memory, normalise_outputs
from .protocol import (
    TORCH_TO_OIP,
    BinaryEncoder,
    DecodedRequest,
    Decoder,
    RequestError,
    TensorSpec,
    dumps,
    dumps_outputs,
    encode_outputs,
    error_body,
    loads,
    raw_bytes,
)
from .request_id import header as request_id_header
from .request_id import new_id

perf_counter = time.perf_counter
get_running_loop = asyncio.get_running_loop

LOADING, READY, FAILED, DRAINING = "loading", "ready", "failed", "draining"
RETRY_AFTER = [(b"retry-after", b"1")]
BINARY_TYPE = (b"content-type", b"application/octet-stream")  # first of the headers: App uses it as the type
_TIMEOUT = object()  # future result: the request's deadline passed before its batch started
# A forward at least this long (the last one measured) sends the next batches to the forward thread: its hop (~50 us)
# is then a few per cent of the forward, and the loop is free for the next batch's requests meanwhile (ADR 1716).
OFFLOAD_SECONDS = 0.001


class ModelError:
    """Future result: the forward raised for this request's input."""

    __slots__ = ("message", "status")

    def __init__(self, exc: BaseException) -> None:
        oom = type(exc).__name__ == "OutOfMemoryError"
        self.status = 503 if oom else 400
        what = "out of memory running the model" if oom else "the model rejected this input"
        self.message = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"


@dataclass(slots=True)
class _Item:
    tensors: list[torch.Tensor]
    rows: int
    fut: asyncio.Future | _Callback  # the flush calls its set_result
    t_enqueued: float
    deadline: float
    picked: bool = False


class _Callback:
    """Stands in for the future of a request submitted without a coroutine (``Engine.submit``): the flush's
    ``set_result`` answers it at once. Never raises: an error answering one request (a bug) is logged and
    answered 500, and its batch's other requests are still answered."""

    __slots__ = ("done", "engine", "req")

    def __init__(self, engine: Engine, req: DecodedRequest, done: Callable[[int, bytes, Any], None]) -> None:
        self.engine = engine
        self.req = req
        self.done = done

    def set_result(self, result: Any) -> None:
        try:
            answer = self.engine._answer(self.req, result)
        except Exception as exc:
            log_event("answer_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            answer = (500, error_body(f"internal error: {type(exc).__name__}"), None)
        try:
            self.done(*answer)
        except Exception as exc:
            log_event("answer_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")


class _BatchOutputs:
    """The output tensors of one batched forward, and (made once, on first use) their rows as Python lists:
    one ``tolist`` per batch instead of a split, a reshape and a ``tolist`` per request."""

    __slots__ = ("_lists", "_raws", "metas", "outs")

    def __init__(self, outs: list[torch.Tensor]) -> None:
        self.outs = outs
        self._lists: list[list] | None = None
        self._raws: list[tuple[bytes, int]] | None = None
        self.metas = tuple((o.dtype, tuple(o.shape[1:])) for o in outs)  # BinaryEncoder's layout key

    def raws(self) -> list[tuple[bytes, int]]:
        """Each output's raw bytes and bytes per row (binary answers slice them: one copy per batch)."""
        raws = self._raws
        if raws is None:
            raws = self._raws = []
            for o in self.outs:
                data = raw_bytes(o)
                raws.append((data, len(data) // o.shape[0]))
        return raws

    def lists(self) -> list[list]:
        lists = self._lists
        if lists is None:
            lists = self._lists = [o.reshape(o.shape[0], -1).tolist() for o in self.outs]
        return lists


class _Rows:
    """A request's result from a batch: rows ``start:stop`` of every output (future result)."""

    __slots__ = ("shared", "start", "stop")

    def __init__(self, shared: _BatchOutputs, start: int, stop: int) -> None:
        self.shared = shared
        self.start = start
        self.stop = stop

    def tensors(self) -> list[torch.Tensor]:
        return [o[self.start : self.stop] for o in self.shared.outs]

    def encode(self, specs: list[TensorSpec], wanted: list[str] | None) -> list[dict[str, Any]]:
        """What ``encode_outputs(specs, self.tensors(), wanted)`` returns, from the batch's lists."""
        start, stop = self.start, self.stop
        shared = self.shared
        lists = shared.lists()
        out = []
        for spec, tensor, rows in zip(specs, shared.outs, lists, strict=False):
            if wanted is not None and spec.name not in wanted:
                continue
            data = rows[start] if stop - start == 1 else [v for row in rows[start:stop] for v in row]
            out.append(
                {
                    "name": spec.name,
                    "datatype": TORCH_TO_OIP.get(tensor.dtype, spec.datatype),
                    "shape": [stop - start, *tensor.shape[1:]],
                    "data": data,
                }
            )
        return out


class Engine:
    def __init__(self, cfg: Settings, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.state = LOADING
        self.reason = "model is loading"
        self.serving = False  # infer allowed: model loaded and golden-checked (stays True while draining)
        self.model: LoadedModel | None = None
        self.decoder: Decoder | None = None
        self.out_specs: list[TensorSpec] = []
        self._binary_encoder: BinaryEncoder | None = None
        self.golden_report: dict[str, Any] = {}
        self.in_flight = 0  # infer requests inside the server (HTTP and Zenoh)
        self.waiting = 0  # admitted, not yet picked up for compute
        self.max_waiting = cfg.max_queue_size
        self.timeout = cfg.request_timeout_s
        self.max_batch = cfg.max_batch_size if cfg.max_batch_size > 1 else 1
        self.batching = self.max_batch > 1
        self.delay = cfg.max_batch_delay_ms / 1000.0
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_is_timer = False
        self._last_batch = 1
        # How many requests the server is handling right now, this one included (the server wires it to
        # uvicorn's set of request tasks, which holds a request from the moment its headers are parsed).
        # 1 with an empty queue = alone: run inline, skipping the batching hop. None = unknown: batch.
        self.busy: Callable[[], int] | None = None
        # How many clients sent a request since a given perf_counter() time (the server wires it to its
        # connections, httpproto.Protocol.last_request). A batch waits (up to the delay) for that many
        # requests: the clients answered by the previous batch come back a round trip later, and a batch
        # formed without them splits the clients into cohorts that never merge (ADR 1704). None: unknown.
        self.clients: Callable[[float], int] | None = None
        # Requests a frontend has received that are not answered yet (grpc_server.py: gRPC calls, counted before their
        # message is read). More of them than are queued: others are on their way, so a batch waits for them (up to
        # the delay) even after a batch of one. None: no such frontend (HTTP alone decides by the last batch).
        self.arriving: Callable[[], int] | None = None
        self._target = 1  # rows the timed flush waits for
        self._forward_seconds = 0.0  # how long the last forward took, batched or inline (the clients' window)
        self._pool: ThreadPoolExecutor | None = None  # the forward thread, made on first use
        self._forward_busy = False  # a batch is running on the forward thread (nothing else computes meanwhile)
        self._module: Any = None
        self._cuda = False
        self._resp_prefix = b""
        self.features: Any = None  # features.FeatureSource when served with a feature service
        self.fetcher: Any = None  # features.FetchCoalescer: its keyed requests' online reads
        self.flags: Any = None  # flags.RuntimeFlags when served with --flags-file
        m = self.metrics
        m.model_labels["color"] = cfg.color
        m.gauge("in_flight_requests", "Infer requests being handled", lambda: self.in_flight)
        m.gauge("queue_depth", "Admitted infer requests waiting for compute", lambda: self.waiting)
        # The bound queue_depth is measured against (--max-queue-size): alerts need no copy of the flag.
        m.gauge("queue_capacity", "Requests that may wait (--max-queue-size); beyond: 503", lambda: self.max_waiting)
        m.gauge("ready", "1 when /v2/health/ready answers 200", lambda: 1.0 if self.state == READY else 0.0)
        if cfg.chaos_latency_ms or cfg.chaos_error_rate:  # tests only: wraps infer, see chaos.py
            from .chaos import install

            install(self)

    # ---------------------------------------------------------------------------------------------
    # Wiring a loaded model in (startup.py loads, warms up and golden-checks it)

    def attach(self, model: LoadedModel) -> None:
        self.model = model
        self._module = model.module
        self._cuda = model.device.type == "cuda"
        self.decoder = Decoder(model.inputs, model.outputs, model.batch_dim)
        self.out_specs = list(model.outputs or [])
        if self.batching and (not model.batch_dim or model.static_batch is not None):
            self.batching = False
            log_event("batching_off", logging.WARNING, reason="the model has no free batch dimension")
        self._resp_prefix = b'{"model_name":' + dumps(model.name) + b',"model_version":' + dumps(model.version)
        m = self.metrics
        m.model_labels.update(model=model.name, version=model.version, device=str(model.device))
        m.info = {"format": model.format, "sha256": model.sha256, "runtime_version": __version__}
        m.load_seconds = model.load_seconds
        if self._cuda:
            dev = model.device
            m.gauge("gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", lambda: cuda_memory(dev)[0])
            m.gauge("gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", lambda: cuda_memory(dev)[1])

    def attach_features(self, source: Any, dtype: torch.dtype) -> None:
        """Serve entity-keyed requests too: ``source`` (features.FeatureSource, opened) fetches the model's
        single [-1, F] input. Only then does ``infer`` get the keyed front; without a feature service the
        vector path is the plain method above. The keyed requests waiting at the same moment share one
        online-store read (features.FetchCoalescer), then join the batcher like any request; while they wait
        for their features they count in ``waiting`` (admission, queue_depth)."""
        from .features import FetchCoalescer

        self.features = source
        self.metrics.features = source
        source.latency = self.metrics.feature_fetch_latency
        vector_infer = self.infer  # the production method (or the chaos wrapper around it)
        marker = b'"' + source.entity_key.encode() + b'"'
        decoder = self.decoder
        assert decoder is not None
        key = source.entity_key
        coalescer = self.fetcher = FetchCoalescer(source, dtype)  # binds source.fetch (after flags.gate_fetch)
        coalescer.busy = lambda: self.busy() if self.busy is not None else 2
        fetch = coalescer.fetch
        entity_values = source.entity_values
        infer = Engine.infer

        async def keyed_infer(body: bytes, t0: float) -> tuple[int, bytes, list | None]:
            if marker not in body:  # carries its vector: exactly the path without a feature service
                return await vector_infer(body, t0)
            if not self.serving:
                return 503, error_body(f"model not ready: {self.reason}"), RETRY_AFTER
            try:
                keyed = decode_keyed(body)
                if keyed is None:
                    return await vector_infer(body, t0)
                if self.waiting >= self.max_waiting:
                    return 503, error_body(f"queue full ({self.max_waiting} requests waiting)"), RETRY_AFTER
                self.waiting += 1
                try:
                    x = await fetch(keyed[1])
                finally:
                    self.waiting -= 1
                req = DecodedRequest(keyed[0], [x], len(keyed[1]), keyed[2])
            except RequestError as exc:
                return exc.status, error_body(exc.message), RETRY_AFTER if exc.status == 503 else None
            return await infer(self, body, t0, req)

        def decode_keyed(body: bytes) -> tuple[str | None, list, list[str] | None] | None:
            """(id, entity keys, outputs) if the request's input is the entity key, else None."""
            try:
                doc = loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                return None  # the vector decoder says what is wrong with it
            items = doc.get("inputs") if type(doc) is dict else None
            if type(items) is not list or not any(type(i) is dict and i.get("name") == key for i in items):
                return None
            if len(items) != 1:
                others = ", ".join(repr(i.get("name")) for i in items if type(i) is dict and i.get("name") != key)
                raise RequestError(f"an entity-keyed request carries only {key!r}, not also {others}")
            req_id = doc.get("id")
            if req_id is not None and type(req_id) is not str:
                raise RequestError("'id' must be a string")
            keys = entity_values(items[0])
            outputs = doc.get("outputs")
            return req_id, keys, decoder._outputs(outputs) if outputs is not None else None

        self.infer = keyed_infer  # type: ignore[method-assign]

    # ---------------------------------------------------------------------------------------------
    # State (called on the loop thread)

    def set_ready(self) -> None:
        self.serving = True
        self.state = READY
        self.reason = ""

    def set_failed(self, reason: str) -> None:
        self.serving = False
        self.state = FAILED
        self.reason = reason

    def begin_drain(self) -> None:
        """Readiness goes 503 at once; requests keep being answered until the server stops."""
        if self.state != DRAINING:
            self.reason = "shutting down"
            self.state = DRAINING

    # ---------------------------------------------------------------------------------------------
    # Hot path

    def forward(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self._cuda:
                dev = self.model.device  # type: ignore[union-attr]
                tensors = [t.to(dev, non_blocking=True) for t in tensors]
            out = self._module(*tensors)
            outs = [out] if type(out) is torch.Tensor else normalise_outputs(out, self.out_specs or None)
            if self._cuda:
                outs = [o.cpu() for o in outs]
        return outs

    def _compute(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | ModelError:
        try:
            return self.forward(tensors)
        except Exception as exc:
            return ModelError(exc)

    async def infer(self, body: bytes, t0: float, req: DecodedRequest | None = None) -> tuple[int, bytes, list | None]:
        """One OIP infer request body -> (status, JSON body, extra headers). Never raises for bad input.
        ``req``: already decoded (an entity-keyed request whose features were fetched, see attach_features)."""
        if req is None:
            if not self.serving:
                return 503, error_body(f"model not ready: {self.reason}"), RETRY_AFTER
            try:
                req = self.decoder.decode(body)  # type: ignore[union-attr]
            except RequestError as exc:
                return exc.status, error_body(exc.message), None
        result = await self.run(req, t0)
        if type(result) is list:
            if req.binary is not None:
                return self._binary_reply(req, result)
            return self._json_reply(req, encode_outputs(self.out_specs, result, req.outputs))
        status, message, headers = result
        return status, error_body(message), headers

    async def run(
        self, req: DecodedRequest, t0: float, alone_inline: bool = True
    ) -> list[torch.Tensor] | tuple[int, str, list | None]:
        """Admission, batching and the forward of one decoded request, whatever its protocol (HTTP here, gRPC in
        grpc_server.py): the output tensors, or (HTTP-equivalent status, message, extra HTTP headers).
        ``alone_inline`` False (gRPC): with batching on and a slow forward, a request that looks alone joins the
        queue too, and its forward runs on the forward thread while the loop accepts the next calls."""
        if self.waiting >= self.max_waiting:
            return 503, f"queue full ({self.max_waiting} requests waiting)", RETRY_AFTER
        self.waiting += 1
        picked = False
        deadline = t0 + self.timeout
        try:
            now = perf_counter()
            if now > deadline:
                result: Any = _TIMEOUT
            elif self.batching and (
                self._queue
                or self._flush_handle
                or self._forward_busy  # a batch is on the forward thread: this one waits for the next
                or self.busy is None
                or self.busy() > 1
                or (self.delay and self._last_batch > 1)  # a client of a concurrent batch: wait for the others
                or (not alone_inline and self._offloading())  # gRPC: lone-looking is not alone (docstring)
            ):
                loop = get_running_loop()
                item = _Item(req.tensors, req.rows, loop.create_future(), now, deadline)
                self._enqueue(item, loop)
                try:
                    result = await item.fut
                finally:
                    # Cancelled while still queued (shutdown): uncount it here; the flush will skip it.
                    picked = item.picked
                    item.picked = True
            else:
                picked = True
                self.waiting -= 1
                m = self.metrics
                m.queue_latency.observe(0.0)  # inline: no queue
                result = self._compute(req.tensors)
                self._forward_seconds = seconds = perf_counter() - now
                m.compute_latency.observe(seconds)
                m.batch_size.observe(req.rows)
        finally:
            if not picked:
                self.waiting -= 1
        if type(result) is _Rows:
            return result.tensors()
        if type(result) is list:
            return result
        if result is _TIMEOUT:
            return 504, f"timed out after {self.timeout:g}s waiting for compute", None
        return result.status, result.message, None

    def submit(
        self, body: bytes, header_length: bytes | None, t0: float, done: Callable[[int, bytes, Any], None]
    ) -> None:
        """``infer`` without a coroutine, for the HTTP direct path (ADR 1715): the request is decoded now and
        answered through ``done(status, body, headers)``, at once or from the flush of its batch. Same checks,
        answers and metrics as ``infer``. With batching on, a request runs inline only when no other client
        sent one lately (``_alone``) and nothing is queued; otherwise it joins the queue, and the flush
        (``call_soon``, after every request parsed in this loop iteration) forms the batch.
        ``header_length``: the binary tensor extension's Inference-Header-Content-Length, else None."""
        if not self.serving:
            done(503, error_body(f"model not ready: {self.reason}"), RETRY_AFTER)
            return
        try:
            req = self.decoder.decode(body, header_length)  # type: ignore[union-attr]
        except RequestError as exc:
            done(exc.status, error_body(exc.message), None)
            return
        if self.waiting >= self.max_waiting:
            done(503, error_body(f"queue full ({self.max_waiting} requests waiting)"), RETRY_AFTER)
            return
        now = perf_counter()
        deadline = t0 + self.timeout
        if now > deadline:
            done(*self._answer(req, _TIMEOUT))
        elif self.batching and (
            self._queue
            or self._flush_handle is not None
            or self._forward_busy
            or self._last_batch > 1
            or not self._alone(now)
        ):
            self.waiting += 1
            self._enqueue(_Item(req.tensors, req.rows, _Callback(self, req, done), now, deadline), get_running_loop())
        else:
            m = self.metrics
            m.queue_latency.observe(0.0)  # inline: no queue
            result = self._compute(req.tensors)
            # An inline forward times the window too (_alone): with delay 0 and only batches timing it, a forward
            # longer than 1 ms made every next client look alone, and a slow model never batched (ADR 1704).
            self._forward_seconds = seconds = perf_counter() - now
            m.compute_latency.observe(seconds)
            m.batch_size.observe(req.rows)
            done(*self._answer(req, result))

    def _offloading(self) -> bool:
        """Batches run on the forward thread: the last forward was slow."""
        return self._forward_seconds >= OFFLOAD_SECONDS

    def _alone(self, now: float) -> bool:
        """No other client sent a request lately (``clients``, the server's connections: this one counts
        itself): a direct request then runs inline, as ``infer`` runs one whose task is the only one."""
        clients = self.clients
        return clients is not None and clients(now - max(0.001, 10 * self.delay, 3 * self._forward_seconds)) <= 1

    def _json_reply(self, req: DecodedRequest, outputs: list) -> tuple[int, bytes, list | None]:
        """A 200 JSON answer of encoded outputs, with the request's id (request_id.py: every answer has one)."""
        rid = req.id if req.id is not None else new_id()
        body = b"".join((self._resp_prefix, b',"id":', dumps(rid), b',"outputs":', dumps_outputs(outputs), b"}"))
        return 200, body, request_id_header(rid)

    def _answer(self, req: DecodedRequest, result: Any) -> tuple[int, bytes, list | None]:
        """A request's compute result (output tensors, its rows of a batch's outputs, ``_TIMEOUT`` or a
        ModelError) -> (status, body, headers)."""
        if type(result) is _Rows:
            if req.binary is not None:
                return self._binary_reply(req, result)
            return self._json_reply(req, result.encode(self.out_specs, req.outputs))
        if type(result) is list:
            if req.binary is not None:
                return self._binary_reply(req, result)
            return self._json_reply(req, encode_outputs(self.out_specs, result, req.outputs))
        if result is _TIMEOUT:
            return 504, error_body(f"timed out after {self.timeout:g}s waiting for compute"), None
        return result.status, error_body(result.message), None

    async def infer_binary(self, body: bytes, header_length: bytes, t0: float) -> tuple[int, bytes, list | None]:
        """An infer request of the binary tensor extension (an ``Inference-Header-Content-Length`` header)."""
        if not self.serving:
            return 503, error_body(f"model not ready: {self.reason}"), RETRY_AFTER
        try:
            req = self.decoder.decode(body, header_length)  # type: ignore[union-attr]
        except RequestError as exc:
            return exc.status, error_body(exc.message), None
        return await Engine.infer(self, body, t0, req)

    @property
    def binary_encoder(self) -> BinaryEncoder:
        """The binary answers' encoder of the current output specs (startup may name the outputs late)."""
        enc = self._binary_encoder
        if enc is None or enc.specs is not self.out_specs:
            enc = self._binary_encoder = BinaryEncoder(self.out_specs)
        return enc

    def _binary_reply(self, req: DecodedRequest, result: list[torch.Tensor] | _Rows) -> tuple[int, bytes, list]:
        """A 200 binary-extension answer; a request's rows of a batch are cut from the batch's raw bytes."""
        rid = req.id if req.id is not None else new_id()  # request_id.py: every answer has an id
        prefix = b"".join((self._resp_prefix, b',"id":', dumps(rid)))
        enc = self.binary_encoder
        answer = None
        if type(result) is _Rows:
            shared = result.shared  # every output has the batch's rows (_batch_results checked)
            answer = enc.encode_rows(
                prefix,
                shared.metas,
                shared.raws(),
                result.start,
                result.stop,
                req.outputs,
                req.binary,  # type: ignore[arg-type]
            )
            if answer is None:  # an output asked for as JSON data
                result = result.tensors()
        body, head = answer or enc.encode(prefix, result, req.outputs, req.binary)  # type: ignore[arg-type]
        head_length = (b"inference-header-content-length", str(head).encode())
        return 200, body, [BINARY_TYPE, head_length, *request_id_header(rid)]

    def _enqueue(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.append(item)
        self._queued_rows += item.rows
        handle = self._flush_handle
        if handle is None:
            if (
                self.delay
                # there is concurrency: wait (up to the delay) for every active client
                and (self._last_batch > 1 or (self.arriving is not None and self.arriving() > self._queued_rows))
                and self._queued_rows < self.max_batch
                and self._queued_rows < (target := self._expected())
            ):
                self._target = target
                self._flush_handle = loop.call_later(self.delay, self._flush)
                self._flush_is_timer = True
            else:
                self._flush_handle = loop.call_soon(self._flush)
                self._flush_is_timer = False
        elif self._flush_is_timer and self._queued_rows >= self._target:
            handle.cancel()
            self._flush_handle = loop.call_soon(self._flush)
            self._flush_is_timer = False

    def _expected(self) -> int:
        """Rows the next batch waits for: one per client active in the last few batch cycles (at most
        ``max_batch_size``); without the server's connection count, the previous batch's size."""
        clients = self.clients
        if clients is None:
            return min(self.max_batch, self._last_batch)
        window = max(10 * self.delay, 3 * self._forward_seconds)
        return max(1, min(self.max_batch, clients(perf_counter() - window)))

    def _flush(self) -> None:
        self._flush_handle = None
        if self._forward_busy:
            return  # the batch on the forward thread flushes again when it is done (_offloaded)
        queue = self._queue
        m = self.metrics
        max_rows = self.max_batch
        while queue:
            now = perf_counter()
            batch: list[_Item] = []
            rows = 0
            while queue and (not batch or rows + queue[0].rows <= max_rows):
                item = queue.popleft()
                self._queued_rows -= item.rows
                if item.picked:  # its handler was cancelled (server shutting down) and uncounted it
                    continue
                self.waiting -= 1
                item.picked = True
                if now > item.deadline:
                    item.fut.set_result(_TIMEOUT)
                    continue
                m.queue_latency.observe(now - item.t_enqueued)
                batch.append(item)
                rows += item.rows
            if batch:
                if self._offloading():
                    self._offload(batch, rows)
                    return  # one batch at a time there; the rest waits for it (and gathers more)
                self._run_batch(batch, rows)
                self._last_batch = len(batch)

    def _run_batch(self, batch: list[_Item], rows: int) -> None:
        t = perf_counter()
        results = self._batch_results(batch, rows)
        self._batch_done(batch, results, rows, perf_counter() - t)

    def _batch_results(self, batch: list[_Item], rows: int) -> list[Any]:
        """The forward of one batch: each item's result (on the loop, or on the forward thread: no loop state)."""
        if len(batch) == 1:
            return [self._compute(batch[0].tensors)]
        try:
            n_inputs = len(batch[0].tensors)
            merged = [torch.cat([it.tensors[i] for it in batch]) for i in range(n_inputs)]
            outs = self.forward(merged)
            if any(o.dim() == 0 or o.shape[0] != rows for o in outs):
                raise ValueError("output rows do not match input rows")
        except Exception:
            # One bad request must not fail its neighbours: run them one by one.
            return [self._compute(it.tensors) for it in batch]
        shared = _BatchOutputs(outs)
        results: list[Any] = []
        start = 0
        for it in batch:
            stop = start + it.rows
            results.append(_Rows(shared, start, stop))
            start = stop
        return results

    def _batch_done(self, batch: list[_Item], results: list[Any], rows: int, seconds: float) -> None:
        for it, result in zip(batch, results, strict=True):
            fut = it.fut
            if type(fut) is _Callback or not fut.done():  # done: cancelled (shutdown) while on the forward thread
                fut.set_result(result)
        self._forward_seconds = seconds
        m = self.metrics
        m.compute_latency.observe(seconds)
        m.batch_size.observe(rows)

    def _offload(self, batch: list[_Item], rows: int) -> None:
        """Run one batch on the forward thread; answer it and flush the next one from the loop when it is done."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._forward_busy = True
        loop = get_running_loop()

        def timed() -> tuple[list[Any], float]:
            t = perf_counter()
            return self._batch_results(batch, rows), perf_counter() - t

        loop.run_in_executor(pool, timed).add_done_callback(lambda f: self._offloaded(f, batch, rows, loop))

    def _offloaded(self, f: asyncio.Future, batch: list[_Item], rows: int, loop: asyncio.AbstractEventLoop) -> None:
        self._forward_busy = False
        if f.cancelled() or f.exception() is not None:  # not the model's error (those are results): a bug, or shutdown
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            log_event("forward_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            error = ModelError(exc)  # type: ignore[arg-type]
            error.status, error.message = 500, f"internal error running the model: {type(exc).__name__}"
            results: list[Any] = [error] * len(batch)
            seconds = self._forward_seconds
        else:
            results, seconds = f.result()
        self._batch_done(batch, results, rows, seconds)
        self._last_batch = len(batch)
        if self._queue:  # arrived during the forward: they have waited one already, flush now
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = loop.call_soon(self._flush)
            self._flush_is_timer = False

    # ---------------------------------------------------------------------------------------------
    # Documents

    def metadata(self) -> dict[str, Any]:
        """OIP model metadata. ``parameters.golden`` is the golden example itself ({inputs, outputs, rtol,
        atol}), so a smoke test can replay it without a copy of its own; ``golden_source`` says where it
        came from."""
        model = self.model
        assert model is not None
        golden = model.golden
        extra: dict[str, Any] = {"golden_source": golden.source if golden else "absent"}
        if golden:
            extra["golden"] = {
                "inputs": golden.inputs,
                "outputs": golden.outputs,
                "rtol": golden.rtol,
                "atol": golden.atol,
            }
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": "pytorch",
            "inputs": [s.metadata() for s in model.inputs],
            "outputs": [s.metadata() for s in self.out_specs],
            "parameters": {
                "format": model.format,
                "source": model.source,
                "sha256": model.sha256,
                "device": str(model.device),
                "color": self.cfg.color,
                "max_batch_size": self.max_batch if self.batching else 1,
                **extra,
                **self._feature_metadata(golden),
                **model.details,
            },
        }

    def _feature_metadata(self, golden: Any) -> dict[str, Any]:
        """``parameters.feature_service``: what an entity-keyed request looks like, and the golden rows by
        key (the deploy's smoke test replays them: plugins/modules/smoke_test.py)."""
        source = self.features
        if source is None:
            return {}
        doc: dict[str, Any] = {
            "name": source.service_name,
            "entity_key": source.entity_key,
            "features": list(source.features),
        }
        if golden is not None and golden.entity_inputs:
            doc["golden_entity_inputs"] = golden.entity_inputs
        return {"feature_service": doc}
