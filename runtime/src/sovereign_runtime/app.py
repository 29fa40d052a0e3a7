"""The raw ASGI application: routing, body limits, JSON errors. No framework on the hot path.

Every answer is JSON (``/metrics`` excepted); every client mistake is a 4xx ``{"error": "..."}``.

The direct path (ADR 1715): an infer request that httpproto.Protocol has read whole (``POST`` to this
model's exact infer URL, a Content-Length within the limit) skips ASGI: ``infer_direct`` hands it to
``Engine.submit`` and ``_answer_direct`` writes the answer, the same bytes ``_infer`` + ``_reply`` send
through ASGI, metrics, request ids and experiment records included. Everything else (other URLs, chunked
or oversized bodies, an engine whose ``infer`` is wrapped: chaos, feature service) takes the ASGI path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE as _STATUS_LINE

from . import __version__
from .engine import BINARY_TYPE, READY, RETRY_AFTER, Engine
from .logs import log_event
from .protocol import dumps, error_body

perf_counter = time.perf_counter
STATUS_LINE = _STATUS_LINE  # uvicorn's status lines, as it writes them
_ERROR_500 = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
    b"connection: close\r\n\r\nInternal Server Error"
)
JSON = (b"content-type", b"application/json")
METRICS_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
GET_ONLY = [(b"allow", b"GET, HEAD")]
POST_ONLY = [(b"allow", b"POST")]
_LIVE = dumps({"live": True})
_SERVER = dumps(
    {"name": "sovereign-runtime", "version": __version__, "extensions": ["model_repository_none", "binary_tensor_data"]}
)


class BodyTooLarge(Exception):
    pass


class App:
    """``on_startup`` / ``on_shutdown`` run on ASGI lifespan events (the server loads the model there)."""

    def __init__(
        self,
        engine: Engine,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = engine.metrics
        self.max_body = engine.cfg.max_body_bytes
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown
        self.on_infer: Callable[[list | None, int, float], None] | None = None  # experiment.py records answers
        self.post_routes: dict[str, Callable[..., Awaitable[None]]] = {}  # experiment.py: POST /v2/outcomes
        self._direct_model: Any = None  # the model _direct_urls were made for
        self._direct_urls: frozenset[bytes] = frozenset()
        self._version_line = b""  # b"x-sovereign-model-version: ...\r\n"
        self._exact = {
            "/v2/health/live": self._live,
            "/v2/health/ready": self._ready,
            "/v2": self._server_meta,
            "/v2/": self._server_meta,
            "/metrics": self._metrics,
        }

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_startup:
                    await self.on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_shutdown:
                    await self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope["path"]
        method = scope["method"]
        handler = self._exact.get(path)
        if handler is not None:
            if method != "GET" and method != "HEAD":
                await self._reply(send, "other", 405, error_body(f"{method} not allowed on {path}"), GET_ONLY)
                return
            await handler(send, method)
            return
        if not path.startswith("/v2/models/"):
            post = self.post_routes.get(path)
            if post is not None:
                await post(scope, receive, send, method)
                return
            await self._reply(send, "other", 404, error_body(f"unknown path {path[:200]!r}"))
            return
        parts = path[11:].split("/")
        name = parts[0]
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version = rest[1]
            rest = rest[2:]
        else:
            version = None
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if action is None or action not in ("", "ready", "infer"):
            await self._reply(send, "other", 404, error_body(f"unknown path {path[:200]!r}"))
            return
        endpoint = "infer" if action == "infer" else ("model_ready" if action else "metadata")
        allowed = method == "POST" if action == "infer" else method in ("GET", "HEAD")
        if not allowed:
            headers = POST_ONLY if action == "infer" else GET_ONLY
            await self._reply(send, endpoint, 405, error_body(f"{method} not allowed on {path[:200]}"), headers)
            return
        problem = self._model_problem(name, version)
        if problem:
            await self._reply(send, endpoint, problem[0], error_body(problem[1]), problem[2])
            return
        if action == "infer":
            await self._infer(scope, receive, send)
        elif action == "ready":
            ready = self.engine.state == READY
            body = dumps({"name": name, "ready": ready, **({} if ready else {"reason": self.engine.reason})})
            await self._reply(send, endpoint, 200 if ready else 503, body, None, method)
        else:  # a model is loaded: _model_problem answered otherwise
            await self._reply(send, endpoint, 200, dumps(self.engine.metadata()), None, method)

    def _model_problem(self, name: str, version: str | None) -> tuple[int, str, Any] | None:
        model = self.engine.model
        if model is None:
            wanted = self.engine.cfg.model_name
            if wanted and name != wanted:
                return 404, f"unknown model {name[:200]!r}; this server serves {wanted!r}", None
            return 503, f"model not loaded yet: {self.engine.reason}", RETRY_AFTER
        if name != model.name:
            return 404, f"unknown model {name[:200]!r}; this server serves {model.name!r}", None
        if version is not None and version != model.version:
            return 404, f"unknown version {version[:100]!r} of {model.name!r}; serving version {model.version!r}", None
        return None

    async def _infer(self, scope: dict, receive: Callable, send: Callable) -> None:
        engine = self.engine
        t0 = perf_counter()
        engine.in_flight += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except BodyTooLarge:
                await self._reply(send, "infer", 413, error_body(f"request body larger than {self.max_body} bytes"))
                return
            if body is None:  # client went away
                return
            for key, value in scope["headers"]:  # the binary tensor extension (Triton's, tritonclient's)
                if key == b"inference-header-content-length":
                    status, payload, headers = await engine.infer_binary(body, value, t0)
                    break
            else:
                status, payload, headers = await engine.infer(body, t0)
            if headers and headers[0] is BINARY_TYPE:
                headers = headers[1:]
                await self._reply(send, "infer", status, payload, headers, "POST", BINARY_TYPE)
            else:
                await self._reply(send, "infer", status, payload, headers)
            latency = perf_counter() - t0
            self.metrics.request_latency.observe(latency)
            if self.on_infer is not None:
                self.on_infer(headers, status, latency)
        finally:
            engine.in_flight -= 1

    # ---------------------------------------------------------------------------------------------
    # The direct path (httpproto.Protocol, ADR 1715)

    def takes_direct(self, url: bytes) -> bool:
        """Whether a POST to the raw request target ``url`` goes to ``infer_direct``: this model's infer URL,
        spelled exactly (no query, no percent-encoding), and an engine whose ``infer`` is the plain one."""
        engine = self.engine
        model = engine.model
        if model is not self._direct_model:
            self._direct_model = model
            self._direct_urls = _infer_urls(model)
            self._version_line = b"x-sovereign-model-version: " + model.version.encode() + b"\r\n" if model else b""
        return url in self._direct_urls and "infer" not in engine.__dict__  # chaos / features wrap infer

    def infer_direct(self, conn: Any, body: bytes, header_length: bytes | None) -> None:
        """One whole infer request from httpproto.Protocol; ``conn.send(data)`` writes the answer."""
        engine = self.engine
        t0 = perf_counter()
        engine.in_flight += 1

        def done(status: int, payload: bytes, headers: list | None) -> None:
            engine.in_flight -= 1
            self._answer_direct(conn, t0, status, payload, headers)

        try:
            engine.submit(body, header_length, t0, done)
        except Exception as exc:  # a bug: uvicorn's answer to an app that raised (500, logged, closed)
            if not conn.response_complete:
                engine.in_flight -= 1
                log_event("infer_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                conn.keep_alive = False
                conn.send(_ERROR_500)

    def _answer_direct(self, conn: Any, t0: float, status: int, payload: bytes, headers: list | None) -> None:
        """What ``_infer`` and ``_reply`` send, as one piece of bytes (uvicorn's formatting)."""
        self.metrics.count("infer", status)
        ctype = b"content-type: application/json\r\ncontent-length: "
        if headers and headers[0] is BINARY_TYPE:
            headers = headers[1:]
            ctype = b"content-type: application/octet-stream\r\ncontent-length: "
        head = [STATUS_LINE[status], *conn.default_lines(), ctype, str(len(payload)).encode(), b"\r\n"]
        head.append(self._version_line)
        if headers:
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n" if conn.keep_alive else b"connection: close\r\n\r\n")
        head.append(payload)
        conn.send(b"".join(head))
        latency = perf_counter() - t0
        self.metrics.request_latency.observe(latency)
        if self.on_infer is not None:
            self.on_infer(headers, status, latency)

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        limit = self.max_body
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    if int(value) > limit:
                        raise BodyTooLarge
                except ValueError:
                    pass  # the HTTP parser has already refused malformed lengths
                break
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise BodyTooLarge
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reply(
        self,
        send: Callable,
        endpoint: str,
        status: int,
        body: bytes,
        headers: list | None = None,
        method: str = "GET",
        content_type: tuple[bytes, bytes] = JSON,
    ) -> None:
        self.metrics.count(endpoint, status)
        head = [content_type, (b"content-length", str(len(body)).encode())]
        model = self.engine.model
        if model is not None:  # which model answered (HAProxy adds X-Sovereign-Color; ADR 1401)
            head.append((b"x-sovereign-model-version", model.version.encode()))
        if headers:
            head.extend(headers)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    async def _live(self, send: Callable, method: str) -> None:
        await self._reply(send, "live", 200, _LIVE, None, method)

    async def _ready(self, send: Callable, method: str) -> None:
        engine = self.engine
        if engine.state == READY:
            if engine.features is None:
                await self._reply(send, "ready", 200, b'{"ready":true}', None, method)
            else:  # ready even while the online store is down: vector requests are still served
                body = dumps({"ready": True, "details": {"feature_store": engine.features.details()}})
                await self._reply(send, "ready", 200, body, None, method)
        else:
            body = dumps({"ready": False, "state": engine.state, "reason": engine.reason})
            await self._reply(send, "ready", 503, body, None, method)

    async def _server_meta(self, send: Callable, method: str) -> None:
        await self._reply(send, "server_metadata", 200, _SERVER, None, method)

    async def _metrics(self, send: Callable, method: str) -> None:
        await self._reply(send, "metrics", 200, self.metrics.render(), None, method, METRICS_TYPE)


def _infer_urls(model: Any) -> frozenset[bytes]:
    """The request targets of ``model``'s infer endpoint that need no decoding (ASCII letters, digits, ``-._~``)."""
    if model is None:
        return frozenset()
    urls = []
    for name in (model.name,):
        if not _plain(name):
            continue
        urls.append(f"/v2/models/{name}/infer".encode())
        if _plain(model.version):
            urls.append(f"/v2/models/{name}/versions/{model.version}/infer".encode())
    return frozenset(urls)


def _plain(segment: str) -> bool:
    return bool(segment) and segment.isascii() and all(c.isalnum() or c in "-._~" for c in segment)
