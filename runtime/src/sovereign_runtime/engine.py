"""The serving core, independent of HTTP: readiness state, admission, dynamic batching, forward, encoding.

Execution model (see docs/adr/0101-runtime-serving-design.md):

* Everything on the hot path runs on the event loop thread, the forward pass included. Handing a
  ~20 us forward to a worker thread costs more (GIL hand-offs, wake-ups) than it saves.
* Batching off (``max_batch_size`` 0 or 1): each request runs its forward inline, in its handler.
* Batching on, and the request is alone (no other request parsed, nothing queued): inline, exactly as
  with batching off. Otherwise it joins a queue and a flush is scheduled with ``call_soon``; the flush
  runs after every request already parsed in this loop iteration has joined, so requests that arrive
  together share one forward. The optional ``max_batch_delay_ms`` wait applies only when the previous
  batch held more than one request (there is concurrency); a lone client never waits for a batch.
* Admission is bounded: more than ``max_queue_size`` admitted, unanswered-for requests -> 503 with
  Retry-After. A request still waiting for compute after ``request_timeout_s`` -> 504 (a forward in
  progress is not interrupted).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__
from .config import Settings
from .logs import log_event
from .metrics import Metrics
from .model import Golden, LoadedModel, ModelLoadError, cuda_memory, load, normalise_outputs
from .protocol import (
    OIP_TO_TORCH,
    TORCH_TO_OIP,
    Decoder,
    RequestError,
    TensorSpec,
    dumps,
    encode_outputs,
    error_body,
    tensor_from_json,
)

perf_counter = time.perf_counter
get_running_loop = asyncio.get_running_loop

LOADING, READY, FAILED, DRAINING = "loading", "ready", "failed", "draining"
RETRY_AFTER = [(b"retry-after", b"1")]
_TIMEOUT = object()  # future result: the request's deadline passed before its batch started


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
    fut: asyncio.Future
    t_enqueued: float
    deadline: float
    picked: bool = False


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
        self.golden_report: dict[str, Any] = {}
        self.in_flight = 0  # infer requests inside the server (HTTP and Zenoh)
        self.waiting = 0  # admitted, not yet picked up for compute
        self.max_waiting = cfg.max_queue_size
        self.timeout = cfg.request_timeout_s
        self.max_batch = cfg.max_batch_size if cfg.max_batch_size > 1 else 1
        self.batching = self.max_batch > 1
        self.delay = cfg.max_batch_delay_ms / 1000.0
        self.chaos_latency = cfg.chaos_latency_ms / 1000.0
        self.chaos_rate = cfg.chaos_error_rate
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_is_timer = False
        self._last_batch = 1
        # How many requests the server is handling right now, this one included (the server wires it to
        # uvicorn's set of request tasks, which holds a request from the moment its headers are parsed).
        # 1 with an empty queue = alone: run inline, skipping the batching hop. None = unknown: batch.
        self.busy: Callable[[], int] | None = None
        self._module: Any = None
        self._cuda = False
        self._resp_prefix = b""
        m = self.metrics
        m.model_labels["color"] = cfg.color
        m.gauge("in_flight_requests", "Infer requests being handled", lambda: self.in_flight)
        m.gauge("queue_depth", "Admitted infer requests waiting for compute", lambda: self.waiting)
        m.gauge("ready", "1 when /v2/health/ready answers 200", lambda: 1.0 if self.state == READY else 0.0)

    # ---------------------------------------------------------------------------------------------
    # Start-up: load, warm up, golden check (run in a worker thread by the server, inline by `check`)

    def prepare(self) -> dict[str, Any]:
        """Load the model and gate it on the golden check. Raises ModelLoadError when nothing can be
        served; returns a report whose ``ok`` says whether the golden check passed."""
        cfg = self.cfg
        model = load(
            cfg.model_uri,
            name=cfg.model_name,
            version=cfg.model_version,
            device=cfg.device,
            tracking_uri=cfg.tracking_uri,
            golden_file=cfg.golden_file,
            allow_pickle=cfg.allow_pickle,
        )
        self.attach(model)
        log_event(
            "model_loaded",
            model=model.name,
            version=model.version,
            format=model.format,
            device=str(model.device),
            source=model.source,
            sha256=model.sha256,
            load_seconds=round(model.load_seconds, 3),
        )
        if model.golden is None and cfg.require_golden:
            raise ModelLoadError(
                "no golden input/output found (golden.json in the MLflow model dir, <file>.golden.json, or "
                "--golden-file); pass --no-require-golden to serve without one"
            )
        t0 = perf_counter()
        report = self.warmup_and_check(model.golden)
        self.metrics.warmup_seconds = perf_counter() - t0
        report.update(model=model.name, version=model.version, device=str(model.device), format=model.format)
        report["load_seconds"] = round(model.load_seconds, 3)
        report["warmup_seconds"] = round(self.metrics.warmup_seconds, 3)
        self.golden_report = report
        return report

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

    def warmup_and_check(self, golden: Golden | None) -> dict[str, Any]:
        assert self.decoder is not None
        iterations = max(1, self.cfg.warmup_iterations)
        if golden is None:
            sample = self._zeros_sample()
            if sample is None:
                return {"ok": True, "golden": "absent", "warmup": "skipped: input shape unknown"}
            for _ in range(iterations):
                outs = self._forward(sample)
            self._describe_outputs(outs)
            return {"ok": True, "golden": "absent", "warmup": f"{iterations} x zeros"}
        try:
            req = self.decoder.decode(dumps({"inputs": golden.inputs}))
        except RequestError as exc:
            return {"ok": False, "golden": golden.source, "error": f"golden inputs do not fit the model: {exc.message}"}
        try:
            for _ in range(iterations):
                outs = self._forward(req.tensors)
            self._describe_outputs(outs)
            if self.batching:
                self._check_batching(req.tensors, req.rows, outs, golden, iterations)
        except Exception as exc:  # a model that cannot run its own golden input is not ready
            return {"ok": False, "golden": golden.source, "error": f"forward failed: {type(exc).__name__}: {exc}"}
        return self._compare(outs, golden)

    def _zeros_sample(self) -> list[torch.Tensor] | None:
        assert self.model is not None
        sample = []
        for spec in self.model.inputs:
            if spec.shape is None or not spec.datatype:
                return None
            shape = [1 if d == -1 else d for d in spec.shape]
            sample.append(torch.zeros(shape, dtype=OIP_TO_TORCH[spec.datatype]))
        return sample

    def _describe_outputs(self, outs: list[torch.Tensor]) -> None:
        """Without a signature, outputs are named output__N with the datatypes the model produced."""
        if not self.out_specs or len(self.out_specs) != len(outs):
            self.out_specs = [
                TensorSpec(f"output__{i}", TORCH_TO_OIP.get(t.dtype, "FP32"), (-1, *t.shape[1:]))
                for i, t in enumerate(outs)
            ]
            assert self.model is not None
            self.model.outputs = self.out_specs
            self.decoder.output_names = {s.name for s in self.out_specs}  # type: ignore[union-attr]

    def _check_batching(self, tensors, rows, single, golden: Golden, iterations: int) -> None:
        """Warm the largest batch shape and make sure the model is row-independent: the golden rows
        repeated up to max_batch_size must give the golden outputs back, row for row."""
        reps = max(2, self.max_batch // max(rows, 1))
        big = [t.repeat(reps, *([1] * (t.dim() - 1))) for t in tensors]
        for _ in range(iterations):
            outs = self._forward(big)
        ok = all(o.shape[0] == rows * reps for o in outs) and all(
            torch.allclose(o[:rows].double(), s.double(), rtol=golden.rtol, atol=golden.atol)
            for o, s in zip(outs, single, strict=True)
        )
        if not ok:
            self.batching = False
            log_event("batching_off", logging.WARNING, reason="batched outputs differ from unbatched ones")

    def _compare(self, outs: list[torch.Tensor], golden: Golden) -> dict[str, Any]:
        names = [s.name for s in self.out_specs]
        worst = 0.0
        report: dict[str, Any] = {"ok": True, "golden": golden.source, "rtol": golden.rtol, "atol": golden.atol}
        for item in golden.outputs:
            name, expected = tensor_from_json(item)
            if name not in names:
                return {**report, "ok": False, "error": f"golden output {name!r} is not a model output {names}"}
            got = outs[names.index(name)]
            if tuple(got.shape) != tuple(expected.shape):
                return {
                    **report,
                    "ok": False,
                    "error": f"output {name!r}: shape {list(got.shape)}, golden {list(expected.shape)}",
                }
            diff = (got.double() - expected.double()).abs()
            err = float(diff.max()) if diff.numel() else 0.0
            worst = max(worst, err)
            if not torch.allclose(got.double(), expected.double(), rtol=golden.rtol, atol=golden.atol):
                report.update(ok=False, error=f"output {name!r} differs from golden: max abs error {err:.3g}")
        report["max_abs_error"] = worst
        return report

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

    def _forward(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
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
            return self._forward(tensors)
        except Exception as exc:
            return ModelError(exc)

    async def infer(self, body: bytes, t0: float) -> tuple[int, bytes, list | None]:
        """One OIP infer request body -> (status, JSON body, extra headers). Never raises for bad input."""
        if not self.serving:
            return 503, error_body(f"model not ready: {self.reason}"), RETRY_AFTER
        try:
            req = self.decoder.decode(body)  # type: ignore[union-attr]
        except RequestError as exc:
            return exc.status, error_body(exc.message), None
        if self.chaos_rate and random.random() < self.chaos_rate:
            self.metrics.chaos_injected += 1
            return 500, error_body("chaos: injected failure (--chaos-error-rate)", chaos=True), None
        if self.waiting >= self.max_waiting:
            return 503, error_body(f"queue full ({self.max_waiting} requests waiting)"), RETRY_AFTER
        self.waiting += 1
        picked = False
        deadline = t0 + self.timeout
        try:
            if self.chaos_latency:
                await asyncio.sleep(self.chaos_latency)
            now = perf_counter()
            if now > deadline:
                result: Any = _TIMEOUT
            elif self.batching and (self._queue or self._flush_handle or self.busy is None or self.busy() > 1):
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
                m.compute_latency.observe(perf_counter() - now)
                m.batch_size.observe(req.rows)
        finally:
            if not picked:
                self.waiting -= 1
        if type(result) is list:
            outputs = encode_outputs(self.out_specs, result, req.outputs)
            rid = b',"id":' + dumps(req.id) if req.id is not None else b""
            return 200, b"".join((self._resp_prefix, rid, b',"outputs":', dumps(outputs), b"}")), None
        if result is _TIMEOUT:
            return 504, error_body(f"timed out after {self.timeout:g}s waiting for compute"), None
        return result.status, error_body(result.message), None

    def _enqueue(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.append(item)
        self._queued_rows += item.rows
        handle = self._flush_handle
        if handle is None:
            if self.delay and self._last_batch > 1 and self._queued_rows < self.max_batch:
                self._flush_handle = loop.call_later(self.delay, self._flush)
                self._flush_is_timer = True
            else:
                self._flush_handle = loop.call_soon(self._flush)
                self._flush_is_timer = False
        elif self._flush_is_timer and (self._queued_rows >= self.max_batch or len(self._queue) >= self._last_batch):
            handle.cancel()
            self._flush_handle = loop.call_soon(self._flush)
            self._flush_is_timer = False

    def _flush(self) -> None:
        self._flush_handle = None
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
                self._run_batch(batch, rows)
                self._last_batch = len(batch)

    def _run_batch(self, batch: list[_Item], rows: int) -> None:
        m = self.metrics
        t = perf_counter()
        if len(batch) == 1:
            batch[0].fut.set_result(self._compute(batch[0].tensors))
        else:
            try:
                n_inputs = len(batch[0].tensors)
                merged = [torch.cat([it.tensors[i] for it in batch]) for i in range(n_inputs)]
                outs = self._forward(merged)
                if any(o.dim() == 0 or o.shape[0] != rows for o in outs):
                    raise ValueError("output rows do not match input rows")
            except Exception:
                # One bad request must not fail its neighbours: run them one by one.
                for it in batch:
                    it.fut.set_result(self._compute(it.tensors))
            else:
                sizes = [it.rows for it in batch]
                parts = [o.split(sizes) for o in outs]
                for j, it in enumerate(batch):
                    it.fut.set_result([p[j] for p in parts])
        m.compute_latency.observe(perf_counter() - t)
        m.batch_size.observe(rows)

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
                **model.details,
            },
        }


def freeze_heap() -> None:
    """Move everything allocated so far (torch, the model, uvicorn) out of the GC's reach: a full
    collection over ~500k objects stalls every in-flight request for 200+ ms (ARCHITECTURE §10)."""
    gc.collect()
    gc.freeze()
