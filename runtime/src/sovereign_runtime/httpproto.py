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


class Protocol(HttpToolsProtocol):
    """``uvicorn.Config(http=Protocol)``."""

    _linger_left = -1  # >= 0: lingering, this many more bytes are read and dropped
    _linger_timer: asyncio.TimerHandle | None = None

    last_request = 0.0  # perf_counter() when this connection's latest request arrived (Engine.clients)

    def on_headers_complete(self) -> None:
        self.last_request = perf_counter()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = Cycle  # before its task first runs: the app's send is Cycle.send
            cycle._proto = self

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
