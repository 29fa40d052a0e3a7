"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, what Triton and KServe serve), on
its own port (``--grpc-port``; 0 = off), beside HTTP in the same process (docs/adr/1705-runtime-grpc.md).

One engine for both: a gRPC ModelInfer is turned into the same decoded request the HTTP JSON path builds
(``Decoder.validate``: the same checks, the same messages), goes through the same admission, batching and forward
(``Engine.run``), and is counted in the same metrics (``sovereign_runtime_requests_total`` with ``endpoint``
``grpc_<method>`` and the HTTP-equivalent ``code``; the same ``request_duration_seconds``, ``in_flight_requests``).
Readiness is the engine's: ServerReady/ModelReady false while loading, failed or draining; ModelInfer before the
model is served answers UNAVAILABLE.

The server is grpcio's asyncio server on the runtime's own event loop (uvloop): no thread hop between the gRPC
call and the engine. Tensors come as ``raw_input_contents`` (what tritonclient sends) or as typed
``contents``; the answer uses the same form (raw when the request was raw: tritonclient reads either).

Not on gRPC (HTTP only): entity-keyed requests (--feature-service), the chaos knobs, A/B records.
"""

from __future__ import annotations

import ctypes
import logging
import time
from asyncio import current_task
from math import prod
from typing import Any

import grpc
import torch
from grpc import aio

from . import __version__
from .config import Settings
from .engine import READY, Engine
from .logs import log_event
from .oip_grpc import oip_v2_pb2 as pb
from .protocol import ITEMSIZE, TORCH_TO_OIP, DecodedRequest, RequestError, _Raw
from .request_id import new_id

perf_counter = time.perf_counter
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ("model_repository_none",)
Code = grpc.StatusCode

# HTTP-equivalent status -> gRPC status (the code the metrics count is the HTTP one, as for HTTP and Zenoh).
GRPC_CODE = {
    400: Code.INVALID_ARGUMENT,
    404: Code.NOT_FOUND,
    413: Code.RESOURCE_EXHAUSTED,
    500: Code.INTERNAL,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}

# The typed-contents field of each datatype (OIP v2 gRPC). FP16 and BF16 have none: raw bytes only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class Refused(Exception):
    """A call answered with a gRPC error: ``status`` is the HTTP equivalent (metrics), ``code`` the gRPC one."""

    def __init__(self, status: int, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or GRPC_CODE.get(status, Code.INTERNAL)


def decode(engine: Engine, request: Any) -> tuple[DecodedRequest, bool]:
    """A ModelInferRequest -> (the engine's decoded request, whether its tensors came raw), or RequestError
    naming the problem. The tensors pass through the HTTP path's validation (``Decoder.validate``)."""
    inputs = request.inputs
    raws = request.raw_input_contents
    if raws and len(raws) != len(inputs):
        raise RequestError(
            f"raw_input_contents has {len(raws)} entr{'y' if len(raws) == 1 else 'ies'} for {len(inputs)} input(s):"
            " send every input's data raw (one entry per input, in order) or none"
        )
    items: list[dict[str, Any]] = []
    for i, tensor in enumerate(inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if raws:
            size = len(raws[i])
            itemsize = ITEMSIZE.get(datatype)
            if itemsize is not None and all(d >= 0 for d in shape) and size != prod(shape) * itemsize:
                raise RequestError(
                    f"input {name!r}: raw_input_contents[{i}] has {size} bytes, shape {shape} of {datatype}"
                    f" needs {prod(shape) * itemsize}"
                )
            item["parameters"] = {"binary_data_size": size}
        else:
            field = CONTENTS_FIELD.get(datatype)
            data = list(getattr(tensor.contents, field)) if field is not None else []
            if not data and all(d >= 0 for d in shape) and prod(shape):
                _no_typed_data(name, datatype, field, tensor)
            item["data"] = data
        items.append(item)
    doc: dict[str, Any] = {"inputs": items}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [{"name": o.name} for o in request.outputs]
    raw = _Raw(b"".join(raws), 0) if raws else None
    return engine.decoder.validate(doc, raw), bool(raws)  # type: ignore[union-attr]


def _no_typed_data(name: str, datatype: str, field: str | None, tensor: Any) -> None:
    if datatype in ("FP16", "BF16"):
        raise RequestError(f"input {name!r}: {datatype} has no typed contents field: send it in raw_input_contents")
    if field is None:
        return  # an unknown datatype: the decoder names it
    filled = [f.name for f, _ in tensor.contents.ListFields()] if tensor.HasField("contents") else []
    got = f"the request filled {', '.join(filled)}" if filled else "the request has no data for it"
    raise RequestError(f"input {name!r}: {datatype} data goes in contents.{field} (or raw_input_contents); {got}")


class GrpcFrontend:
    """``inference.GRPCInferenceService`` for one engine, on the running event loop."""

    def __init__(self, engine: Engine, cfg: Settings) -> None:
        self.engine = engine
        self.cfg = cfg
        self.metrics = engine.metrics
        self.server: aio.Server | None = None
        self.port = 0
        # ModelInfer calls received (their method looked up, before the message is read) and not finished: counted up
        # in _Handlers.service, down when grpcio's task for the call ends, whether or not it reached model_infer
        # (cancelled, too large). The batcher counts them with the HTTP requests in progress: several calls arriving
        # together share a forward (and a batch waits for those on their way, Engine.arriving); a lone one runs inline.
        self.pending = 0
        # The most calls pending at once lately: the batch delay's "active clients" (ADR 1704) for gRPC, whose
        # clients may share one connection (HTTP/2 streams; all of them through HAProxy).
        self._peak = 0
        self._peak_at = 0.0
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }
        self.handlers = {
            f"/{SERVICE}/{name}": grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (behavior, request, response) in methods.items()
        }
        self._infer_path = f"/{SERVICE}/ModelInfer"

    # ---------------------------------------------------------------------------------------------
    # Lifecycle (on the event loop)

    async def start(self) -> int:
        """Bind and start; the port bound (``--grpc-port``). Raises OSError naming the address when it cannot bind."""
        cfg = self.cfg
        options = [
            # One process per port unless --workers shares it on purpose: gRPC's default (SO_REUSEPORT on) would
            # let a second runtime bind the same port silently and take half of its calls.
            ("grpc.so_reuseport", 1 if getattr(cfg, "workers", 1) > 1 else 0),
            ("grpc.max_receive_message_length", cfg.max_body_bytes),  # the HTTP body limit, same flag
            ("grpc.max_send_message_length", -1),
        ]
        server = aio.server(options=options)
        server.add_generic_rpc_handlers((_Handlers(self),))
        host = cfg.host if ":" not in cfg.host or cfg.host.startswith("[") else f"[{cfg.host}]"
        address = f"{host}:{cfg.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            port, why = 0, str(exc)
        else:
            why = "address in use or not available"
        if not port:
            raise OSError(f"gRPC: cannot listen on {address}: {why}")
        await server.start()
        self.server, self.port = server, port
        engine = self.engine
        http_busy, http_clients = engine.busy, engine.clients
        if http_busy is not None:  # None (not wired): the engine batches every request anyway
            engine.busy = lambda: http_busy() + self.pending
        engine.arriving = lambda: self.pending
        if http_clients is not None:

            def clients(since: float) -> int:
                if self._peak_at < since:  # the peak is older than the engine's window: start a new one
                    self._peak, self._peak_at = self.pending, perf_counter()
                return http_clients(since) + self._peak

            engine.clients = clients
        return port

    async def stop(self, grace: float) -> None:
        """Refuse new calls at once (GOAWAY); calls in progress get ``grace`` seconds to finish."""
        if self.server is not None:
            await self.server.stop(grace)

    def _finished(self, task: Any) -> None:
        self.pending -= 1

    # ---------------------------------------------------------------------------------------------
    # Methods

    async def server_live(self, request: Any, context: aio.ServicerContext) -> Any:
        self.metrics.count("grpc_live", 200)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: aio.ServicerContext) -> Any:
        ready = self.engine.state == READY
        self.metrics.count("grpc_ready", 200 if ready else 503)
        return pb.ServerReadyResponse(ready=ready)

    async def server_metadata(self, request: Any, context: aio.ServicerContext) -> Any:
        self.metrics.count("grpc_server_metadata", 200)
        return pb.ServerMetadataResponse(name="sovereign-runtime", version=__version__, extensions=EXTENSIONS)

    async def model_ready(self, request: Any, context: aio.ServicerContext) -> Any:
        try:
            self._model(request.name, request.version)
        except Refused as exc:
            if exc.status != 503:  # not loaded yet: simply not ready
                await self._abort(context, "grpc_model_ready", exc)
        ready = self.engine.state == READY
        self.metrics.count("grpc_model_ready", 200 if ready else 503)
        return pb.ModelReadyResponse(ready=ready)

    async def model_metadata(self, request: Any, context: aio.ServicerContext) -> Any:
        try:
            model = self._model(request.name, request.version)
        except Refused as exc:
            await self._abort(context, "grpc_model_metadata", exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        self.metrics.count("grpc_model_metadata", 200)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform="pytorch",
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape or (-1,))) for s in model.inputs],
            outputs=[
                tensor(name=s.name, datatype=s.datatype, shape=list(s.shape or (-1,))) for s in self.engine.out_specs
            ],
        )

    async def model_infer(self, request: Any, context: aio.ServicerContext) -> Any:
        engine = self.engine
        t0 = perf_counter()
        engine.in_flight += 1
        try:
            model = self._model(request.model_name, request.model_version)
            if not engine.serving:
                raise Refused(503, f"model not ready: {engine.reason}")
            try:
                req, raw = decode(engine, request)
            except RequestError as exc:
                raise Refused(exc.status, exc.message) from None
            result = await engine.run(req, t0, alone_inline=False)  # a lone-looking call: see Engine.run
            if type(result) is not list:
                raise Refused(result[0], result[1])
            response = self._response(model, req, result, raw)
            self.metrics.count("grpc_infer", 200)
            self.metrics.request_latency.observe(perf_counter() - t0)
            return response
        except Refused as exc:
            await self._abort(context, "grpc_infer", exc)
        except Exception as exc:  # a bug here, never the client's: INTERNAL, counted and logged like a 500
            log_event("grpc_infer_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            await self._abort(context, "grpc_infer", Refused(500, f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            engine.in_flight -= 1

    # ---------------------------------------------------------------------------------------------

    def _model(self, name: str, version: str) -> Any:
        """The model named, or Refused like the HTTP routes (404 another model or version, 503 not loaded)."""
        model = self.engine.model
        if model is None:
            wanted = self.cfg.model_name
            if wanted and name != wanted:
                raise Refused(404, f"unknown model {name[:200]!r}; this server serves {wanted!r}")
            raise Refused(503, f"model not loaded yet: {self.engine.reason}")
        if name != model.name:
            raise Refused(404, f"unknown model {name[:200]!r}; this server serves {model.name!r}")
        if version and version != model.version:
            raise Refused(
                404, f"unknown version {version[:100]!r} of {model.name!r}; serving version {model.version!r}"
            )
        return model

    async def _abort(self, context: aio.ServicerContext, endpoint: str, exc: Refused) -> None:
        self.metrics.count(endpoint, exc.status)
        await context.abort(exc.code, exc.message)

    def _response(self, model: Any, req: DecodedRequest, tensors: list[torch.Tensor], raw: bool) -> Any:
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=req.id if req.id is not None else new_id()
        )
        wanted = req.outputs
        pairs = [
            (s, t) for s, t in zip(self.engine.out_specs, tensors, strict=False) if wanted is None or s.name in wanted
        ]
        datatypes = [TORCH_TO_OIP.get(t.dtype, s.datatype) for s, t in pairs]
        if not raw and any(CONTENTS_FIELD.get(d) in (None, "bytes_contents") for d in datatypes):
            raw = True  # FP16/BF16 have no typed field: every output raw (the protocol allows no mix)
        outputs = response.outputs
        contents = response.raw_output_contents
        for (spec, tensor), datatype in zip(pairs, datatypes, strict=True):
            out = outputs.add(name=spec.name, datatype=datatype, shape=list(tensor.shape))
            if raw:
                t = tensor.contiguous()
                size = t.numel() * t.element_size()
                contents.append(ctypes.string_at(t.data_ptr(), size) if size else b"")
            else:
                getattr(out.contents, CONTENTS_FIELD[datatype]).extend(tensor.reshape(-1).tolist())
        return response


class _Handlers(grpc.GenericRpcHandler):
    """The service's methods by path; counts each ModelInfer call from the moment it is received."""

    def __init__(self, frontend: GrpcFrontend) -> None:
        self.frontend = frontend

    def service(self, handler_call_details: Any) -> Any:
        frontend = self.frontend
        method = handler_call_details.method
        if method == frontend._infer_path:
            task = current_task()  # grpcio's task for this call: it ends when the call does, however it ends
            if task is not None:
                frontend.pending += 1
                task.add_done_callback(frontend._finished)
                if frontend.pending > frontend._peak:
                    frontend._peak, frontend._peak_at = frontend.pending, perf_counter()
        return frontend.handlers.get(method)


async def start_grpc(engine: Engine, cfg: Settings) -> GrpcFrontend:
    """The gRPC frontend, listening; OSError (logged) when its port cannot be bound."""
    frontend = GrpcFrontend(engine, cfg)
    try:
        port = await frontend.start()
    except OSError as exc:
        log_event("grpc_failed", logging.ERROR, error=str(exc), host=cfg.host, grpc_port=cfg.grpc_port)
        raise
    log_event("grpc_listening", host=cfg.host, grpc_port=port)
    return frontend
