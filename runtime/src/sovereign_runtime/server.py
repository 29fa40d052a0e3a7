"""uvicorn (uvloop + httptools) around the ASGI app: background loading, readiness, SIGTERM drain.

Lifecycle:

1. The socket opens at once: ``/v2/health/live`` answers 200, ``/v2/health/ready`` 503 (loading).
2. A daemon thread loads the model, warms it up and runs the golden check (startup.py). While the
   MLflow tracking server cannot be reached, ``/v2/health/ready`` says so (host, port, cause, attempt)
   and every failed attempt is logged (``registry_unreachable``), on the schedule of registry.py.
   * Load error (bad URI, registry down after the last attempt, unreadable file): log ``load_failed``,
     answer ready=503 ``{"state": "failed", "reason": ...}`` for ``failed_exit_delay_s`` (so a deploy
     or health checker reads why), then exit 1 (systemd may restart it: the cause can be transient).
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
from .engine import DRAINING, LOADING, Engine
from .flags import open_flags
from .httpproto import Protocol
from .logs import log_event
from .model import ModelLoadError
from .startup import freeze_heap, prepare


class RuntimeServer(uvicorn.Server):
    """One process's lifecycle: start-up in a loader thread, readiness, SIGTERM drain, exit status.

    Each lifecycle step is a method; the loader thread only ever hands results to the event loop
    (``call_soon_threadsafe``), so engine state changes on the loop thread alone."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.app = App(self.engine, on_startup=self.on_startup, on_shutdown=self.on_shutdown)
        super().__init__(
            uvicorn.Config(
                self.app,
                host=cfg.host,
                port=cfg.port,
                loop="uvloop",
                http=Protocol,  # httptools, one write per response, lingering close (httpproto.py)
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
        )
        self.experiments: Any = None
        if cfg.experiment_dir:  # A/B records (experiment.py): opened now, so a bad directory fails the start
            from .experiment import install

            self.experiments = install(self.app, cfg.color, cfg.experiment_dir, cfg.experiment_keep)
        tasks = self.server_state.tasks  # one per HTTP request being handled
        self.engine.busy = tasks.__len__
        connections = self.server_state.connections

        def clients(since: float) -> int:  # connections whose latest request arrived after `since`
            return sum(1 for c in connections if getattr(c, "last_request", 0.0) >= since)

        self.engine.clients = clients
        self.exit_code = 0
        self.bridge: Any = None
        self.grpc: Any = None  # grpc_server.GrpcFrontend with --grpc-port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_at: float | None = None  # SIGTERM: when the listener closes
        self._failed_exit_at: float | None = None  # load failure: when the process exits 1
        self._drain_logged = False

    # ---------------------------------------------------------------------------------------------
    # Start-up (ASGI lifespan startup -> loader thread -> back on the loop)

    async def on_startup(self) -> None:
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        log_event(
            "starting",
            model_uri=cfg.model_uri,
            host=cfg.host,
            port=cfg.port,
            grpc_port=cfg.grpc_port,
            color=cfg.color,
            device=cfg.device,
            max_batch_size=cfg.max_batch_size,
            max_batch_delay_ms=cfg.max_batch_delay_ms,
            torch_threads=cfg.torch_threads,
            registry_attempts=cfg.registry_attempts,
            chaos=bool(cfg.chaos_latency_ms or cfg.chaos_error_rate),
        )
        open_flags(self.engine, self._loop)  # --flags-file: operator switches from a flagd file (flags.py)
        if cfg.grpc_port:  # OIP v2 over gRPC, on this loop, sharing the engine (grpc_server.py)
            from .grpc_server import start_grpc

            # A port that cannot be bound fails the start up (exit 3, as uvicorn does for the HTTP port).
            self.grpc = await start_grpc(self.engine, cfg)
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        """Loader thread: everything slow (fetch, load, warm-up, golden check) happens here."""
        assert self._loop is not None
        call = self._loop.call_soon_threadsafe
        try:
            report = prepare(self.engine, on_retry=lambda reason, fields: call(self.registry_retry, reason, fields))
        except ModelLoadError as exc:
            call(self.load_failed, str(exc), exc.fields)
        except Exception as exc:  # anything else while loading is just as fatal
            call(self.load_failed, f"{type(exc).__name__}: {exc}", {})
        else:
            call(self.prepared, report)

    def registry_retry(self, reason: str, fields: dict[str, Any]) -> None:
        log_event("registry_unreachable", logging.WARNING, reason=reason, **fields)
        if self.engine.state == LOADING:  # a drain's reason wins
            self.engine.reason = reason

    def load_failed(self, reason: str, fields: dict[str, Any]) -> None:
        self.engine.set_failed(reason)
        delay = self.cfg.failed_exit_delay_s
        log_event("load_failed", logging.ERROR, error=reason, exit_in_s=delay, **fields)
        self.exit_code = 1
        self._failed_exit_at = time.monotonic() + delay
        if delay <= 0:
            self.should_exit = True

    def prepared(self, report: dict[str, Any]) -> None:
        engine = self.engine
        if not report.get("ok"):
            engine.set_failed(f"golden check failed: {report.get('error')}")
            log_event("golden_failed", logging.ERROR, **report)
            return
        if (self.cfg.zenoh_key_expr or self.cfg.zenoh_host_key_expr) and not self._start_zenoh():
            return
        if self.cfg.gc_freeze:
            freeze_heap()
        if engine.state == DRAINING:  # SIGTERM arrived while loading: serve, but never report ready
            engine.serving = True
            return
        if engine.flags is not None:
            engine.flags.model_ready()
        engine.set_ready()
        log_event("ready", **report)

    def _start_zenoh(self) -> bool:
        from .zenoh_bridge import ZenohBridge

        try:
            self.bridge = ZenohBridge(self.engine, self.cfg)
            self.bridge.start(asyncio.get_running_loop())
        except Exception as exc:
            self.load_failed(f"zenoh: {type(exc).__name__}: {exc}", {})
            return False
        return True

    # ---------------------------------------------------------------------------------------------
    # Shutdown

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
        if self._failed_exit_at is not None and time.monotonic() >= self._failed_exit_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: Any = None) -> None:
        # gRPC refuses new calls when the HTTP listener closes; its calls in progress get the same drain time.
        stopping = asyncio.ensure_future(self.grpc.stop(self.cfg.drain_timeout_s)) if self.grpc else None
        await super().shutdown(sockets)
        if stopping is not None:
            await stopping

    async def on_shutdown(self) -> None:
        if self.experiments is not None:
            self.experiments.stop()  # writes what is still pending
        if self.engine.flags is not None:
            self.engine.flags.close()
        if self.bridge is not None:
            await self.bridge.stop()

    # ---------------------------------------------------------------------------------------------

    def serve_until_stopped(self) -> int:
        self.run()
        log_event("stopped", exit_code=self.exit_code, state=self.engine.state)
        return self.exit_code


def serve(cfg: Settings) -> int:
    return RuntimeServer(cfg).serve_until_stopped()
