"""uvicorn's httptools protocol with two changes (ADR 1702): one socket write per response, and a 413 (or
any answer) that reaches a client still writing its request body before the connection closes.

* **One write.** uvicorn writes the status line and headers as soon as the app sends
  ``http.response.start``, and the body on ``http.response.body``: two ``write(2)`` calls and two TCP
  segments per response (uvloop writes at once when its buffer is empty). Here a start message that
  carries a ``content-length`` is held back and written together with the body that follows it, in one
  ``write``. HEAD answers, streamed and chunked bodies take uvicorn's own path.
* **Lingering close.** When the answer is complete but the client is still sending the request body
  (a 413 for an oversized body, or any early answer) and the connection must close (``Connection:
  close``, as Python's urllib sends, or HTTP/1.0), closing at once makes the kernel answer the unread
  bytes with a reset, and a client that writes its whole body before reading sees "connection reset" /
  "broken pipe" instead of the answer. Here the server half-closes instead (``write_eof``: the answer and
  a FIN are on their way), reads and discards up to ``LINGER_BYTES`` more for up to ``LINGER_S``, and
  closes when the client does, or at either bound. On a keep-alive connection uvicorn already discards
  the rest of the body and goes on with the next request.

It also notes when each connection's latest request arrived (``last_request``): the engine's batcher counts
the clients that are active (ADR 1704).

* **Direct path** (ADR 1715). An infer request (``POST``, the exact URL ``App.takes_direct`` accepts, a
  Content-Length within ``--max-body-bytes``, no chunked body, no ``Expect: 100-continue``, nothing
  pipelined ahead of it) makes no ASGI scope, cycle or task: its body is collected as the parser delivers
  it and, once whole, handed to ``App.infer_direct``; the answer is one write. ``_Direct`` stands in for
  uvicorn's cycle meanwhile (keep-alive, disconnect, shutdown, a pipelined request queued behind it).

All of it relies on uvicorn internals (``RequestResponseCycle``); tests/unit/runtime/test_httpproto.py checks
them against the uvicorn version pinned in requirements/constraints.txt.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

LINGER_BYTES = 64 * 1024 * 1024  # request-body bytes read and thrown away after an early answer, at most
LINGER_S = 10.0  # and for at most this long


class _Collect:
    """Stands in for the transport while uvicorn formats one response: keeps what it would write."""

    __slots__ = ("closed", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return False


class Cycle(RequestResponseCycle):
    """uvicorn's request/response cycle; ``Protocol`` makes every cycle one of these."""

    _start: dict[str, Any] | None = None
    _proto: Protocol | None = None

    async def send(self, message: Any) -> None:
        start = self._start
        if start is None:
            if (
                message["type"] == "http.response.start"
                and not self.response_started
                and self.scope["method"] != "HEAD"
                and any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))
            ):
                self._start = message  # written with the body
                return
            await RequestResponseCycle.send(self, message)
            return
        if message["type"] != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
        self._start = None
        transport = self.transport
        out = _Collect()
        self.transport = out  # type: ignore[assignment]
        try:
            await RequestResponseCycle.send(self, start)
            await RequestResponseCycle.send(self, message)
        finally:
            self.transport = transport
            if out.parts:
                transport.write(b"".join(out.parts))
            if out.closed:
                proto = self._proto
                if self.more_body and not self.disconnected and proto is not None:
                    proto.linger()  # the client is still sending its body: let it, then close
                else:
                    transport.close()


class _NoEvent:
    @staticmethod
    def set() -> None:
        pass


_NO_EVENT = _NoEvent()


class _Direct:
    """A request on the direct path, in uvicorn's place of the connection's cycle: the attributes its
    protocol reads of a cycle (``response_complete``, ``disconnected``, ``keep_alive``, ``message_event``)."""

    __slots__ = ("disconnected", "header_length", "keep_alive", "parts", "proto", "response_complete")

    message_event = _NO_EVENT  # uvicorn's connection_lost wakes its cycle's reader: there is none

    def __init__(self, proto: Protocol, keep_alive: bool, header_length: bytes | None) -> None:
        self.proto = proto
        self.keep_alive = keep_alive
        self.header_length = header_length
        self.parts: list[bytes] = []
        self.response_complete = False
        self.disconnected = False

    def default_lines(self) -> list[bytes]:
        """uvicorn's default headers (server, date: both off in server.py) as header lines."""
        return [name + b": " + value + b"\r\n" for name, value in self.proto.server_state.default_headers]

    def send(self, data: bytes) -> None:
        """The whole answer (head and body) in one write, then what uvicorn does when a response completes."""
        if self.response_complete:
            return
        self.response_complete = True
        proto = self.proto
        transport = proto.transport
        if self.disconnected or transport.is_closing():
            return
        transport.write(data)
        if not self.keep_alive:
            transport.close()
        proto.on_response_complete()


class Protocol(HttpToolsProtocol):
    """``uvicorn.Config(http=Protocol)``."""

    _linger_left = -1  # >= 0: lingering, this many more bytes are read and dropped
    _linger_timer: asyncio.TimerHandle | None = None
    _direct: _Direct | None = None  # the request being read takes the direct path

    last_request = 0.0  # perf_counter() when this connection's latest request arrived (Engine.clients)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app  # config.loaded_app: the App itself unless uvicorn wrapped it (proxy headers, trace logging)
        self._app = app if hasattr(app, "infer_direct") else None
        self._max_body = app.max_body if self._app is not None else 0

    def on_headers_complete(self) -> None:
        self.last_request = perf_counter()
        app = self._app
        if app is not None and self.parser.get_method() == b"POST" and app.takes_direct(self.url):
            direct = self._take_direct()
            if direct is not None:
                self._direct = direct
                self.cycle = direct  # type: ignore[assignment]
                return
        self._direct = None
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = Cycle  # before its task first runs: the app's send is Cycle.send
            cycle._proto = self

    def _take_direct(self) -> _Direct | None:
        """A _Direct for the request whose headers were just parsed, or None when it needs uvicorn's path."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.expect_100_continue:
            return None
        if self.parser.should_upgrade():
            return None
        length = header_length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"inference-header-content-length":
                header_length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > self._max_body:
            return None  # a body without a length, or one too large: the ASGI path answers it (413, linger)
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        return _Direct(self, keep_alive, header_length)

    def on_body(self, body: bytes) -> None:
        direct = self._direct
        if direct is None:
            super().on_body(body)
        else:
            direct.parts.append(body)

    def on_message_complete(self) -> None:
        direct = self._direct
        if direct is None:
            super().on_message_complete()
            return
        self._direct = None
        parts = direct.parts
        body = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        direct.parts = []
        self._app.infer_direct(direct, body, direct.header_length)  # type: ignore[union-attr]

    def linger(self) -> None:
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger_left = LINGER_BYTES
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        self.flow.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._linger_left < 0:
            super().data_received(data)
            return
        self._linger_left -= len(data)
        if self._linger_left < 0:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)
