"""Optional Zenoh queryable: OIP infer JSON in the query payload, OIP response JSON in the reply.

Two keys (docs/adr/1202-runtime-on-the-zenoh-bus.md): ``--zenoh-key-expr`` (e.g. ``sovereign/infer/{model}``) is
answered only while this color is live when ``--zenoh-live-map`` names the HAProxy live-color map file (polled
every ``LIVE_POLL_S``; the queryable is declared when the map names this color, undeclared when it names the
other), so a switch moves Zenoh traffic with HTTP traffic; ``--zenoh-host-key-expr`` (e.g.
``sovereign/infer/{model}/host/<host>/{color}``) is answered always, live or not. ``{model}`` and ``{color}`` are
filled in once the model is loaded. ``--zenoh-config`` is a Zenoh JSON5 client configuration (routers,
credentials, TLS); the flags override its mode and endpoints.

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


LIVE_POLL_S = 0.5


def live_color(path: str, key: str) -> str | None:
    """The color the HAProxy map file names for ``key`` (``<key> <color>`` lines), None when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == key:
                    return parts[1]
    except OSError:
        return None
    return None


def zenoh_config(cfg: Settings) -> Any:
    import zenoh

    conf = zenoh.Config.from_file(cfg.zenoh_config) if cfg.zenoh_config else zenoh.Config()
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
        self.key_expr = self._fill(cfg.zenoh_key_expr)
        self.host_key_expr = self._fill(cfg.zenoh_host_key_expr)
        self._session: Any = None
        self._queryable: Any = None
        self._host_queryable: Any = None
        self._watch: asyncio.TimerHandle | None = None
        self._withdrawn = False
        self._connect_task: asyncio.Task | None = None
        self.live: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    def _fill(self, template: str) -> str:
        model = getattr(self.engine, "model", None)
        name = getattr(model, "name", None) or self.cfg.model_name or "model"
        return template.replace("{model}", str(name)).replace("{color}", self.cfg.color or "none")

    @staticmethod
    def _reply_key(key_expr: str) -> str | None:
        return None if any(c in key_expr for c in "*$") else key_expr

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check the configuration now (a bad one fails the start), then connect in the background: the bus being
        down never keeps the runtime from serving HTTP; the session is retried until it opens."""
        self._loop = loop
        zenoh_config(self.cfg)
        self._connect_task = loop.create_task(self._connect())

    async def _connect(self) -> None:
        import zenoh

        delay = 1.0
        while not self._withdrawn:
            try:
                session = await asyncio.to_thread(zenoh.open, zenoh_config(self.cfg))
            except Exception as exc:
                log_event(
                    "zenoh_unavailable",
                    logging.WARNING,
                    error=f"{type(exc).__name__}: {exc}",
                    connect=self.cfg.zenoh_connect or self.cfg.zenoh_config,
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._withdrawn:
                session.close()
                return
            self._session = session
            break
        else:
            return
        if self.host_key_expr:
            self._host_queryable = self._session.declare_queryable(
                self.host_key_expr, self._handler(self.host_key_expr), complete=True
            )
        if self.key_expr and self.cfg.zenoh_live_map:
            self._poll_live()
        elif self.key_expr:
            self._declare()
        log_event(
            "zenoh_started",
            key_expr=self.key_expr,
            host_key_expr=self.host_key_expr,
            mode=self.cfg.zenoh_mode,
            live_map=self.cfg.zenoh_live_map,
        )

    def _declare(self) -> None:
        if self._queryable is None and self._session is not None and not self._withdrawn:
            handler = self._handler(self.key_expr)
            self._queryable = self._session.declare_queryable(self.key_expr, handler, complete=True)

    def _undeclare(self) -> None:
        if self._queryable is not None:
            self._queryable.undeclare()
            self._queryable = None

    def _poll_live(self) -> None:  # loop thread, every LIVE_POLL_S
        self._watch = None
        if self._withdrawn or self._loop is None:
            return
        color = live_color(self.cfg.zenoh_live_map, self.cfg.zenoh_live_map_key)
        if color is not None:  # an unreadable map changes nothing
            live = color == self.cfg.color
            if live != self.live:
                try:
                    self._declare() if live else self._undeclare()
                except Exception as exc:
                    log_event("zenoh_declare_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
                else:
                    self.live = live
                    log_event("zenoh_live" if live else "zenoh_idle", key_expr=self.key_expr, live_color=color)
        self._watch = self._loop.call_later(LIVE_POLL_S, self._poll_live)

    def _handler(self, key_expr: str) -> Any:
        reply_key = self._reply_key(key_expr)
        return lambda query: self._on_query(query, reply_key)

    def _on_query(self, query: Any, reply_key: str | None = None) -> None:  # Zenoh's thread
        payload = query.payload
        body = payload.to_bytes() if payload is not None else b""
        loop = self._loop
        if loop is None or loop.is_closed():
            query.drop()
            return
        loop.call_soon_threadsafe(self._spawn, query, body, reply_key)

    def _spawn(self, query: Any, body: bytes, reply_key: str | None = None) -> None:  # loop thread
        task = self._loop.create_task(self._answer(query, body, reply_key))  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, query: Any, body: bytes, reply_key: str | None = None) -> None:
        engine = self.engine
        engine.in_flight += 1
        try:
            status, payload, _ = await engine.infer(body, time.perf_counter())
            engine.metrics.count("zenoh_infer", status)
            if status == 200:
                query.reply(reply_key or query.key_expr, payload)
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
        self._withdrawn = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._undeclare()
        if self._host_queryable is not None:
            self._host_queryable.undeclare()
            self._host_queryable = None

    async def stop(self) -> None:
        self.withdraw()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connect_task
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.cfg.drain_timeout_s)
        if self._session is not None:
            self._session.close()
        self._session = self._queryable = self._host_queryable = None
