"""uvicorn (uvloop + httptools) around the ASGI app: background loading, readiness, SIGTERM drain.

Lifecycle:

1. The socket opens at once: ``/v2/health/live`` answers 200, ``/v2/health/ready`` 503 (loading).
2. A daemon thread loads the model, warms it up and runs the golden check.
   * Load error (bad URI, registry down, unreadable file): log ``load_failed``, exit 1 (systemd may
     restart it: the cause can be transient).
   * Golden mismatch: log ``golden_failed`` and stay up, never ready (a restart would not help; the
     reason is in the ready body and the log).
   * Success: ``gc.freeze()``, then ready (200), log ``ready``.
3. SIGTERM/SIGINT: ready turns 503 at once, the Zenoh queryable is withdrawn; after
   ``shutdown_delay_s`` the listener closes, in-flight requests finish (up to ``drain_timeout_s``),
   idle keep-alive connections close, and the process exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Generator
from typing import Any

import uvicorn

from .app import App
from .config import Settings
from .engine import DRAINING, Engine, freeze_heap
from .logs import log_event
from .model import ModelLoadError


class RuntimeServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, cfg: Settings) -> None:
        super().__init__(config)
        self.engine = engine
        self.cfg = cfg
        self.exit_code = 0
        self.bridge: Any = None
        self._exit_at: float | None = None
        self._drain_logged = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own version re-raises the signal after shutdown, which makes the exit status
        # -SIGTERM instead of 0; a drained shutdown is a success.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._exit_at is not None:  # second signal: stop waiting
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.engine.begin_drain()
        self._exit_at = time.monotonic() + self.cfg.shutdown_delay_s
        if self.cfg.shutdown_delay_s <= 0:
            self.should_exit = True

    def drain(self) -> None:
        """Programmatic SIGTERM (tests, embedding)."""
        self.handle_exit(signal.SIGTERM, None)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None:
            if not self._drain_logged:
                self._drain_logged = True
                log_event(
                    "draining",
                    in_flight=self.engine.in_flight,
                    shutdown_delay_s=self.cfg.shutdown_delay_s,
                    drain_timeout_s=self.cfg.drain_timeout_s,
                )
                if self.bridge is not None:
                    self.bridge.withdraw()
            if time.monotonic() >= self._exit_at:
                self.should_exit = True
        return await super().on_tick(counter)


def build(cfg: Settings) -> tuple[RuntimeServer, App, Engine]:
    engine = Engine(cfg)
    server: RuntimeServer | None = None

    async def on_startup() -> None:
        loop = asyncio.get_running_loop()
        log_event(
            "starting",
            model_uri=cfg.model_uri,
            host=cfg.host,
            port=cfg.port,
            color=cfg.color,
            device=cfg.device,
            max_batch_size=cfg.max_batch_size,
            max_batch_delay_ms=cfg.max_batch_delay_ms,
            torch_threads=cfg.torch_threads,
            chaos=bool(cfg.chaos_latency_ms or cfg.chaos_error_rate),
        )

        def work() -> None:
            try:
                report = engine.prepare()
            except ModelLoadError as exc:
                loop.call_soon_threadsafe(failed, str(exc))
            except Exception as exc:  # anything else while loading is just as fatal
                loop.call_soon_threadsafe(failed, f"{type(exc).__name__}: {exc}")
            else:
                loop.call_soon_threadsafe(prepared, report)

        threading.Thread(target=work, name="model-loader", daemon=True).start()

    def failed(reason: str) -> None:
        engine.set_failed(reason)
        log_event("load_failed", logging.ERROR, error=reason)
        assert server is not None
        server.exit_code = 1
        server.should_exit = True

    def prepared(report: dict[str, Any]) -> None:
        if not report.get("ok"):
            engine.set_failed(f"golden check failed: {report.get('error')}")
            log_event("golden_failed", logging.ERROR, **report)
            return
        if cfg.zenoh_key_expr:
            from .zenoh_bridge import ZenohBridge

            assert server is not None
            try:
                server.bridge = ZenohBridge(engine, cfg)
                server.bridge.start(asyncio.get_running_loop())
            except Exception as exc:
                failed(f"zenoh: {type(exc).__name__}: {exc}")
                return
        if cfg.gc_freeze:
            freeze_heap()
        if engine.state == DRAINING:  # SIGTERM arrived while loading: serve, but never report ready
            engine.serving = True
            return
        engine.set_ready()
        log_event("ready", **report)

    async def on_shutdown() -> None:
        if server is not None and server.bridge is not None:
            await server.bridge.stop()

    app = App(engine, on_startup=on_startup, on_shutdown=on_shutdown)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=cfg.log_level if cfg.log_level != "info" else "warning",
        timeout_graceful_shutdown=cfg.drain_timeout_s,
        timeout_keep_alive=75,  # longer than HAProxy's default http-keep-alive, so the proxy closes first
        backlog=4096,
        proxy_headers=False,  # no use for X-Forwarded-*; saves a middleware hop per request
        server_header=False,
        date_header=False,
    )
    server = RuntimeServer(config, engine, cfg)
    tasks = server.server_state.tasks  # one per HTTP request being handled
    engine.busy = tasks.__len__
    return server, app, engine


def serve(cfg: Settings) -> int:
    server, _, engine = build(cfg)
    server.run()
    log_event("stopped", exit_code=server.exit_code, state=engine.state)
    return server.exit_code
