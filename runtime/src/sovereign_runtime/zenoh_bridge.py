"""Optional Zenoh queryable: OIP infer JSON in the query payload, OIP response JSON in the reply.

Errors (the same validation as HTTP) come back as a Zenoh error reply whose payload is
``{"error": "...", "status": <HTTP-equivalent code>}``. Zenoh calls the handler on its own thread; the
query is handed to the event loop, where it goes through exactly the same Engine.infer as HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from .config import Settings
from .engine import Engine
from .logs import log_event


def _endpoints(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def zenoh_config(cfg: Settings) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("mode", json.dumps(cfg.zenoh_mode))
    if cfg.zenoh_connect:
        conf.insert_json5("connect/endpoints", json.dumps(_endpoints(cfg.zenoh_connect)))
    if cfg.zenoh_listen:
        conf.insert_json5("listen/endpoints", json.dumps(_endpoints(cfg.zenoh_listen)))
    if cfg.zenoh_connect or cfg.zenoh_listen:
        # Explicit endpoints: do not also go looking for peers by multicast.
        conf.insert_json5("scouting/multicast/enabled", "false")
    return conf


class ZenohBridge:
    def __init__(self, engine: Engine, cfg: Settings) -> None:
        self.engine = engine
        self.cfg = cfg
        self.key_expr = cfg.zenoh_key_expr
        self._reply_key = None if any(c in self.key_expr for c in "*$") else self.key_expr
        self._session: Any = None
        self._queryable: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import zenoh

        self._loop = loop
        self._session = zenoh.open(zenoh_config(self.cfg))
        self._queryable = self._session.declare_queryable(self.key_expr, self._on_query, complete=True)
        log_event("zenoh_started", key_expr=self.key_expr, mode=self.cfg.zenoh_mode)

    def _on_query(self, query: Any) -> None:  # Zenoh's thread
        payload = query.payload
        body = payload.to_bytes() if payload is not None else b""
        loop = self._loop
        if loop is None or loop.is_closed():
            query.drop()
            return
        loop.call_soon_threadsafe(self._spawn, query, body)

    def _spawn(self, query: Any, body: bytes) -> None:  # loop thread
        task = self._loop.create_task(self._answer(query, body))  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, query: Any, body: bytes) -> None:
        engine = self.engine
        engine.in_flight += 1
        try:
            status, payload, _ = await engine.infer(body, time.perf_counter())
            engine.metrics.count("zenoh_infer", status)
            if status == 200:
                query.reply(self._reply_key or query.key_expr, payload)
            else:
                err = json.loads(payload)
                err["status"] = status
                query.reply_err(json.dumps(err).encode())
        except Exception as exc:  # a broken reply must not kill the loop
            log_event("zenoh_reply_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
        finally:
            engine.in_flight -= 1
            with contextlib.suppress(Exception):
                query.drop()

    def withdraw(self) -> None:
        """Stop taking new queries (on SIGTERM); queries already taken are still answered."""
        if self._queryable is not None:
            self._queryable.undeclare()
            self._queryable = None

    async def stop(self) -> None:
        self.withdraw()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.cfg.drain_timeout_s)
        if self._session is not None:
            self._session.close()
        self._session = self._queryable = None
