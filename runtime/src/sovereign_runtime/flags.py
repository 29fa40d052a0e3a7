"""Operator switches from a flagd flag file (``--flags-file``), evaluated in-process with the OpenFeature SDK and
flagd's in-process provider in file mode: no flag server (docs/adr/1440-feature-flags-flagd-file-in-process.md).

The provider re-reads the file when its mtime changes (it polls every ``--flags-poll-ms``) and emits
PROVIDER_CONFIGURATION_CHANGED; only then are the switches evaluated, once, with this process's context
(``targetingKey`` = ``<host>/<color>``, plus ``host``, ``color``, ``model``), and applied on the event loop. So a
fractional rollout splits the fleet's runtimes, not requests, and the hot path reads a plain attribute: one
OpenFeature evaluation costs about 250 us here, far too much per request.

Switches (flag key -> effect; a missing flag, a disabled flag or a file that does not parse keeps the default):

* ``runtime-batching`` (boolean, default true): false = every request runs inline, no batching queue.
* ``runtime-feature-fetch`` (boolean, default true): false = entity-keyed requests get 503 naming the flag,
  without reading the online store; requests that carry their vector are served as before.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from .logs import log_event
from .protocol import RequestError

BATCHING = "runtime-batching"
FEATURE_FETCH = "runtime-feature-fetch"
DOMAIN = "sovereign-runtime"


class RuntimeFlags:
    """The switches' current values (plain attributes, read on the hot path) and the provider behind them."""

    def __init__(self, path: str, poll_ms: int, color: str, model: str, host: str | None = None) -> None:
        self.path = path
        self.poll_ms = poll_ms
        self.host = host or socket.gethostname()
        self.color = color
        self.model = model
        self.batching = True
        self.feature_fetch = True
        self.generation = 0  # how many times the file's flags were applied
        self.engine: Any = None  # engine.Engine whose batching follows ``runtime-batching``
        self._batching_allowed: bool | None = None  # known once the model is ready
        self._client: Any = None
        self._api: Any = None

    # ------------------------------------------------------------------------------------------
    def start(self, on_change: Callable[[Callable[[], None]], None]) -> None:
        """Open the provider. ``on_change(fn)`` runs ``fn`` where state may change (the loop's
        call_soon_threadsafe): the provider's events arrive on its watcher thread."""
        from openfeature import api
        from openfeature.contrib.provider.flagd import FlagdProvider
        from openfeature.contrib.provider.flagd.config import ResolverType
        from openfeature.event import ProviderEvent

        provider = FlagdProvider(
            resolver_type=ResolverType.FILE, offline_flag_source_path=self.path, deadline_ms=self.poll_ms
        )
        self._api = api
        self._client = api.get_client(DOMAIN)

        def changed(details: Any) -> None:
            values = self.evaluate()
            if values is None:
                return  # READY follows and evaluates again
            on_change(lambda: self._apply(values, getattr(details, "flags_changed", None)))

        def failed(details: Any) -> None:
            log_event("flags_file_error", logging.ERROR, path=self.path, reason=getattr(details, "message", None))

        # The provider first: a READY handler added earlier would run at once for the domain's no-op provider.
        api.set_provider(provider, DOMAIN)
        self._client.add_handler(ProviderEvent.PROVIDER_READY, changed)
        self._client.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, changed)
        self._client.add_handler(ProviderEvent.PROVIDER_ERROR, failed)

    def close(self) -> None:
        if self._api is not None:
            self._api.shutdown()
            self._api = None

    def model_ready(self) -> None:
        """The start-up checks are done: batching may follow the flag from now on, but is only ever switched back
        on where the settings, the model and the start-up batching check allowed it (called on the loop)."""
        self._batching_allowed = bool(self.engine.batching)
        self._apply_engine()

    def _apply_engine(self) -> None:
        if self.engine is not None and self._batching_allowed is not None:
            self.engine.batching = self.batching and self._batching_allowed

    def context(self) -> Any:
        from openfeature.evaluation_context import EvaluationContext

        attrs = {"host": self.host, "color": self.color, "model": self.model}
        return EvaluationContext(f"{self.host}/{self.color}", attrs)

    def evaluate(self) -> dict[str, bool] | None:
        """The switches' values now, or None while the provider is not ready yet: the file's first load emits
        CONFIGURATION_CHANGED before READY, and an evaluation in between would answer the code defaults."""
        ctx = self.context()
        values = {}
        for name, key in (("batching", BATCHING), ("feature_fetch", FEATURE_FETCH)):
            details = self._client.get_boolean_details(key, True, ctx)
            if getattr(details.error_code, "value", details.error_code) == "PROVIDER_NOT_READY":
                return None
            values[name] = bool(details.value)
        return values

    def _apply(self, values: dict[str, bool], changed: Any) -> None:
        before = {"batching": self.batching, "feature_fetch": self.feature_fetch}
        self.batching = values["batching"]
        self.feature_fetch = values["feature_fetch"]
        self.generation += 1
        log_event("flags_applied", path=self.path, changed=changed, before=before, **values)
        self._apply_engine()

    def state(self) -> dict[str, Any]:
        return {"file": self.path, "generation": self.generation, "batching": self.batching,
                "feature_fetch": self.feature_fetch}  # fmt: skip


def open_flags(engine: Any, loop: asyncio.AbstractEventLoop) -> RuntimeFlags | None:
    """The runtime's flags when ``--flags-file`` is set (else None), started and attached as ``engine.flags``."""
    cfg = engine.cfg
    if not cfg.flags_file:
        return None
    flags = RuntimeFlags(cfg.flags_file, cfg.flags_poll_ms, cfg.color, cfg.model_name or "")
    flags.engine = engine
    engine.flags = flags
    flags.start(loop.call_soon_threadsafe)
    return flags


def gate_fetch(engine: Any, source: Any) -> None:
    """Wrap ``source.fetch`` (features.FeatureSource) so that ``runtime-feature-fetch`` false answers 503 before any
    online-store read. Called before engine.attach_features, which binds ``source.fetch``."""
    flags = getattr(engine, "flags", None)
    if flags is None:
        return
    fetch = source.fetch

    def gated(keys: list[Any], dtype: Any) -> Any:
        if not flags.feature_fetch:
            raise RequestError(
                f"feature fetching is off (flag {FEATURE_FETCH!r} in {flags.path}); send the feature vector instead",
                503,
            )
        return fetch(keys, dtype)

    source.fetch = gated
