"""Online features for entity-keyed requests: the model's Feast feature service, read in-process.

With ``--feature-service NAME --feast-repo PATH`` an infer request may carry the entity key instead of
the feature vector (``{"name": "customer_id", "datatype": "INT64", "shape": [n], "data": [...]}``). The
runtime reads that entity's features from Feast's online store itself (the Feast SDK straight to Redis:
no feature-server HTTP hop), lays them out in the model's input order and runs the usual batching and
forward. A request that carries its vector is decoded exactly as without a feature service.

Read path (docs/adr/1620-runtime-feature-fetch.md; measured in docs/benchmarks.md): the FeatureStore is
opened once, at start-up (the registry is read then: the service, its feature views, the entity's join
key, the feature order); a read is one ``Provider.online_read`` per feature view (one Redis pipeline of
HMGETs), decoded here straight into a tensor. ``FeatureStore.get_online_features`` does the same read and
then builds a columnar response (type maps, status vectors, a dict per feature): 3-5x the cost of the read
itself for one entity, for nothing a tensor needs.

Coalescing (docs/adr/1631-coalesced-feature-fetch.md): the keyed requests waiting at the same moment share
one read (FetchCoalescer), so 16 concurrent requests cost one Redis round trip, not 16 in a row on the
loop; a request alone reads at once. Each request is answered by its own keys: one unknown key fails only
the request that asked for it.

Failure handling:

* an entity the online store does not hold (Feast answers nulls, not "not found"), or one whose row is
  older than its feature view's ``ttl``, or with any null feature: 404 naming the key and the values, for
  the request that asked for it; nulls never reach the model;
* the online store unreachable (connection refused, timeout, auth): 503 naming the store and the error,
  for every keyed request of that read. The store is then marked *down*: for ``retry_s`` entity-keyed
  requests fail fast with that 503 without touching the network (so a blackholed Redis cannot stall the
  loop once per request), then the next read tries again; the first read that succeeds marks it up.
  Requests that carry their vector never touch the store, readiness stays 200 (with the outage in its
  ``details``), and ``/metrics`` shows it (``feature_store_up``, ``feature_fetches_total{result}`` and
  ``feature_fetch_duration_seconds``, both per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

from .logs import log_event
from .protocol import OIP_TO_TORCH, RequestError, TensorSpec

perf_counter = time.perf_counter

# Feast ValueProto fields that carry a scalar the model can take, by Feast entity value type.
_ENTITY_FIELD = {"INT64": "int64_val", "INT32": "int32_val", "STRING": "string_val"}
_ENTITY_OIP = {"INT64": ("INT64", "INT32", "UINT32", "UINT16", "UINT8", "INT16", "INT8"), "INT32": ("INT32",)}


class FeatureStoreError(Exception):
    """The feature service cannot be used at all (bad repo, unknown service, model mismatch): start fails."""


class UnknownEntities(RequestError):
    """404: some keys have no complete, fresh online row. ``rows``: every key's row (zeros where missing, never
    served); ``missing``: key -> what it lacks. The coalescer answers each request by its own keys only."""

    def __init__(self, message: str, rows: torch.Tensor, missing: dict[Any, list[str]]) -> None:
        super().__init__(message, 404)
        self.rows = rows
        self.missing = missing


class StoreUnavailable(RequestError):
    """503: the online store cannot be read. ``attempted``: False when it failed fast (store marked down)."""

    def __init__(self, message: str, attempted: bool) -> None:
        super().__init__(message, 503)
        self.attempted = attempted


class FeatureSource:
    """One feature service of one Feast repository, opened once; ``fetch`` is the per-request read."""

    def __init__(self, service: str, repo: str, timeout_s: float = 0.1, retry_s: float = 1.0) -> None:
        self.service_name = service
        self.repo = repo
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.store: Any = None
        self.entity_key = ""
        self.entity_type = ""
        self.features: list[str] = []  # feature names, in the order the model takes them
        self.where = ""  # the online store, for messages ("redis 10.0.0.5:6379")
        self._reads: list[tuple[Any, list[str], int, float]] = []  # (feature view, names, first column, ttl s)
        self._read: Any = None
        self._config: Any = None
        self._make_key: Any = None
        self._value_type: Any = None
        # Health of the online store as last seen (loop thread only).
        self.up = True
        self.down_since = 0.0
        self.last_error = ""
        self._retry_at = 0.0
        self.ok = 0
        self.unknown = 0
        self.unavailable = 0
        self.reads = 0  # online reads attempted (feature_store_reads_total)
        self.latency: Any = None  # metrics.Histogram, set by the engine

    # ---------------------------------------------------------------------------------------------
    # Start-up (loader thread)

    def open(self) -> None:
        """Read the registry: the service, its feature views and their entity. Raises FeatureStoreError."""
        try:
            from feast import FeatureStore
            from feast.protos.feast.types.EntityKey_pb2 import EntityKey
            from feast.protos.feast.types.Value_pb2 import Value
        except ImportError as exc:
            raise FeatureStoreError(
                f"--feature-service needs the Feast SDK: install sovereign-runtime[feast] ({exc})"
            ) from None
        try:
            store = FeatureStore(repo_path=self.repo)
        except Exception as exc:
            raise FeatureStoreError(
                f"cannot open the Feast repository {self.repo}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            service = store.get_feature_service(self.service_name, allow_cache=False)
        except Exception as exc:
            try:
                known = sorted(s.name for s in store.list_feature_services())
            except Exception:
                known = []
            raise FeatureStoreError(
                f"feature service {self.service_name!r} is not in the Feast registry of project "
                f"{store.project!r} ({type(exc).__name__}); it has {', '.join(map(repr, known)) or 'none'}"
            ) from None
        join_keys: set[tuple[str, str]] = set()
        column = 0
        for projection in service.feature_view_projections:
            fv = store.get_feature_view(projection.name)
            names = [f.name for f in projection.features]
            for entity_name in fv.entities:
                entity = store.get_entity(entity_name)
                key = projection.join_key_map.get(entity.join_key, entity.join_key)
                join_keys.add((key, entity.value_type.name))
            ttl = fv.ttl.total_seconds() if fv.ttl else 0.0
            self._reads.append((fv, names, column, ttl))
            self.features.extend(names)
            column += len(names)
        if len(join_keys) != 1:
            raise FeatureStoreError(
                f"feature service {self.service_name!r}: its feature views must share one single-key entity "
                f"(found join keys {sorted(join_keys)})"
            )
        ((self.entity_key, self.entity_type),) = join_keys
        if self.entity_type not in _ENTITY_FIELD:
            raise FeatureStoreError(
                f"entity key {self.entity_key!r} has value type {self.entity_type}; the runtime takes INT64, "
                "INT32 or STRING keys"
            )
        self.store = store
        self._config = store.config
        online = store.config.online_store
        address = _strip_secret(getattr(online, "connection_string", ""))
        self.where = f"{getattr(online, 'type', 'online store')} {address}"
        self._limit_redis_waits(online)
        self._read = store._get_provider().online_read
        self._make_key = EntityKey
        self._value_type = Value
        log_event(
            "feature_service_opened",
            service=self.service_name,
            project=store.project,
            entity_key=self.entity_key,
            features=",".join(self.features),
            online_store=self.where,
        )

    def _limit_redis_waits(self, online: Any) -> None:
        """Bound how long one read may block the loop: socket timeouts on the Redis connection (unless the
        repo's connection string sets its own) and no client-side retry loop with back-off sleeps."""
        text = getattr(online, "connection_string", None)
        if getattr(online, "type", "") != "redis" or not isinstance(text, str):
            return
        parts = [p for p in text.split(",") if p]
        given = {p.split("=", 1)[0] for p in parts if "=" in p}
        for option in ("socket_timeout", "socket_connect_timeout"):
            if option not in given:
                parts.append(f"{option}={self.timeout_s:g}")
        online.connection_string = ",".join(parts)
        try:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            store = self.store._get_provider().online_store
            client = store._get_client(online)
            client.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
            client.retry = Retry(NoBackoff(), 0)  # redis-py >= 6 retries 3 times with back-off by default
        except Exception as exc:  # not fatal: the socket timeouts still bound each attempt
            log_event("feature_store_retry_unchanged", logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def check_model(self, inputs: list[TensorSpec]) -> tuple[int, torch.dtype]:
        """Which model input the features fill and in which dtype: one input of shape [-1, F] (F = the
        service's feature count), columns in the service's order. Raises FeatureStoreError otherwise."""
        n = len(self.features)
        if len(inputs) == 1:
            spec = inputs[0]
            fits = spec.shape is None or (len(spec.shape) == 2 and spec.shape[1] in (-1, n))
            dtype = OIP_TO_TORCH.get(spec.datatype or "FP32")
            if fits and dtype is not None and dtype.is_floating_point:
                return 0, dtype
        shapes = ", ".join(f"{s.name} {s.datatype} {list(s.shape) if s.shape else '?'}" for s in inputs)
        raise FeatureStoreError(
            f"feature service {self.service_name!r} yields {n} features ({', '.join(self.features)}); the model "
            f"takes {shapes}: it needs one floating-point input of shape [-1, {n}]"
        )

    # ---------------------------------------------------------------------------------------------
    # Hot path (event loop thread)

    def entity_values(self, item: dict[str, Any]) -> list[Any]:
        """The entity keys of an OIP tensor named after the join key (checked like any input)."""
        datatype = item.get("datatype")
        shape = item.get("shape")
        data = item.get("data")
        key = self.entity_key
        if self.entity_type == "STRING":
            if datatype != "BYTES":
                raise RequestError(f"input {key!r}: datatype must be BYTES (the entity key is a string)")
        elif datatype not in _ENTITY_OIP.get(self.entity_type, ()):
            raise RequestError(f"input {key!r}: datatype must be {self.entity_type} (got {datatype!r})")
        if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 1:
            raise RequestError(f"input {key!r}: shape must be [n], n >= 1 entity keys")
        want = str if self.entity_type == "STRING" else int
        if type(data) is not list or len(data) != shape[0] or not all(type(v) is want for v in data):
            raise RequestError(f"input {key!r}: 'data' must be a flat list of {shape[0]} {want.__name__} key(s)")
        return data

    def fetch(self, keys: list[Any], dtype: torch.dtype) -> torch.Tensor:
        """[len(keys), F] tensor of the keys' online features: one ``online_read`` per feature view (one Redis
        pipeline for all the keys). Raises UnknownEntities (404, with the rows it did find) or StoreUnavailable
        (503). Counts nothing: FetchCoalescer does, per request. Any thread, one at a time."""
        now = time.monotonic()
        if not self.up and now < self._retry_at:
            raise StoreUnavailable(self._down_message(now), attempted=False)
        self.reads += 1
        field = _ENTITY_FIELD[self.entity_type]
        value_type = self._value_type
        entity = [self._make_key(join_keys=[self.entity_key], entity_values=[value_type(**{field: k})]) for k in keys]
        rows = [[0.0] * len(self.features) for _ in keys]
        missing: dict[Any, list[str]] = {}
        try:
            for fv, names, first, ttl in self._reads:
                results = self._read(self._config, fv, entity, names.copy())  # Feast appends to the list
                oldest = time.time() - ttl if ttl else None
                for key, row, (stamp, values) in zip(keys, rows, results, strict=True):
                    if values is None or (stamp is not None and stamp.timestamp() <= 0):
                        missing.setdefault(key, []).extend(names)
                        continue
                    if oldest is not None and stamp is not None and stamp.timestamp() < oldest:
                        missing.setdefault(key, []).append(f"{fv.name} (older than its ttl {ttl:g}s)")
                        continue
                    for j, name in enumerate(names):
                        value = values.get(name)
                        kind = value.WhichOneof("val") if value is not None else None
                        if kind is None or kind == "null_val":
                            missing.setdefault(key, []).append(name)
                        else:
                            row[first + j] = getattr(value, kind)
        except Exception as exc:
            self._mark_down(now, exc)
            raise StoreUnavailable(self._down_message(now), attempted=True) from None
        if not self.up:
            self._mark_up()
        tensor = torch.tensor(rows, dtype=dtype)
        if missing:
            raise UnknownEntities(self.unknown_message(missing), tensor, missing)
        return tensor

    def unknown_message(self, missing: dict[Any, list[str]]) -> str:
        shown = "; ".join(f"{self.entity_key}={k!r}: {', '.join(v[:8])}" for k, v in list(missing.items())[:5])
        return (
            f"unknown entity: the online store of feature service {self.service_name!r} has no features for "
            f"{shown} (not materialized, expired, or no such {self.entity_key})"
        )

    def _mark_down(self, now: float, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if self.up:
            self.up = False
            self.down_since = time.time()
            log_event("feature_store_down", logging.ERROR, service=self.service_name, store=self.where, error=error)
        self.last_error = error
        self._retry_at = now + self.retry_s

    def _mark_up(self) -> None:
        log_event(
            "feature_store_up",
            service=self.service_name,
            store=self.where,
            down_s=round(time.time() - self.down_since, 3),
        )
        self.up = True
        self.last_error = ""

    def _down_message(self, now: float) -> str:
        return (
            f"feature store unavailable: cannot read {self.where} for feature service {self.service_name!r} "
            f"({self.last_error}); down since {_iso(self.down_since)}, next attempt in "
            f"{max(0.0, self._retry_at - now):.1f}s; requests that carry their feature vector are still served"
        )

    # ---------------------------------------------------------------------------------------------

    def details(self) -> dict[str, Any]:
        """For the readiness body and model metadata."""
        doc: dict[str, Any] = {
            "feature_service": self.service_name,
            "entity_key": self.entity_key,
            "online_store": self.where,
            "up": self.up,
        }
        if not self.up:
            doc.update(error=self.last_error, down_since=_iso(self.down_since))
        return doc


# Keys per coalesced read at most (ADR 1631): ~50 us per key on the loaded 2-core lab machine (16 keys 1.05-1.10 ms
# p50, docs/benchmarks.md), so ~13 ms for 256, far inside the 100 ms socket timeout.
MAX_READ_KEYS = 256


class _Wait:
    __slots__ = ("fut", "keys", "t0")

    def __init__(self, keys: list[Any], fut: asyncio.Future, t0: float) -> None:
        self.keys = keys
        self.fut = fut
        self.t0 = t0


class FetchCoalescer:
    """The keyed requests waiting at the same moment share one ``FeatureSource.fetch``: one ``online_read`` per
    feature view, one Redis pipeline, for all their keys (docs/adr/1631-coalesced-feature-fetch.md).

    A request that is alone (nothing pending, the server handling this request only) reads at
    once, inline. Otherwise it joins ``pending`` and the first to join schedules the read with ``call_soon``: every
    request already parsed in this loop iteration joins the same read, as the batcher does for forwards, and
    their futures are answered together; each then goes on to the batcher. The read runs on the loop thread: a
    dedicated fetch thread was measured and not taken (ADR 1631). Accounting (``feature_fetches_total``, the
    fetch histogram) is per request.
    """

    def __init__(self, source: FeatureSource, dtype: torch.dtype) -> None:
        self.source = source
        self.dtype = dtype
        self._fetch = source.fetch  # bound now: flags.gate_fetch may have wrapped it (runtime-feature-fetch)
        self._pending: list[_Wait] = []
        self._handle: asyncio.Handle | None = None
        self.busy: Callable[[], int] | None = None  # requests in the server (the engine's busy), None: unknown
        self.reads = 0  # online reads done (tests, benchmarks: requests per read = fetches / reads)

    async def fetch(self, keys: list[Any]) -> torch.Tensor:
        """This request's [len(keys), F] features. Raises RequestError (404 for its own keys, 503)."""
        t0 = perf_counter()
        if not self._pending and self.busy is not None and self.busy() <= 1:
            result = self._read([_Wait(keys, None, t0)])[0]  # type: ignore[arg-type]
        else:
            loop = asyncio.get_running_loop()
            wait = _Wait(keys, loop.create_future(), t0)
            self._pending.append(wait)
            if self._handle is None:
                self._handle = loop.call_soon(self._flush)
            result = await wait.fut
        if type(result) is torch.Tensor:
            return result
        raise result

    def _flush(self) -> None:
        self._handle = None
        pending = self._pending
        if not pending:
            return
        # At most MAX_READ_KEYS keys per read (one request's own keys always go in one read, however many): a
        # bounded read stays well inside the socket timeout, whose expiry would mark the store down for all.
        n = len(pending[0].keys)
        cut = 1
        while cut < len(pending) and n + len(pending[cut].keys) <= MAX_READ_KEYS:
            n += len(pending[cut].keys)
            cut += 1
        waits = pending[:cut]
        self._pending = pending[cut:]
        if self._pending:
            self._handle = asyncio.get_running_loop().call_soon(self._flush)
        try:
            results = self._read(waits)
        except Exception as exc:  # a bug in the read: its requests get it (a 500), none is left hanging
            for w in waits:
                if not w.fut.done():
                    w.fut.set_exception(exc)
            return
        for w, r in zip(waits, results, strict=True):
            if not w.fut.done():  # its handler was cancelled (shutdown)
                w.fut.set_result(r)

    def _read(self, waits: list[_Wait]) -> list[Any]:
        """Read and account: per request, its tensor or its RequestError."""
        result = self._fetch_all(waits)
        self._account(waits, result)
        return result[0]

    def _fetch_all(self, waits: list[_Wait]) -> tuple[list[Any], str]:
        """One fetch for every waiting request's keys -> (per request: tensor or RequestError, outcome)."""
        self.reads += 1
        keys = waits[0].keys if len(waits) == 1 else [k for w in waits for k in w.keys]
        try:
            rows = self._fetch(keys, self.dtype)
        except UnknownEntities as exc:
            rows, missing = exc.rows, exc.missing
        except StoreUnavailable as exc:
            return [exc] * len(waits), "unavailable" if exc.attempted else "failed_fast"
        except RequestError as exc:  # refused before any read (flag runtime-feature-fetch off)
            return [exc] * len(waits), "refused"
        else:
            if len(waits) == 1:
                return [rows], "read"
            return list(rows.split([len(w.keys) for w in waits])), "read"
        message = self.source.unknown_message
        out: list[Any] = []
        start = 0
        for w in waits:
            part = rows[start : start + len(w.keys)]
            start += len(w.keys)
            own = {k: missing[k] for k in w.keys if k in missing}
            out.append(UnknownEntities(message(own), part, own) if own else part)
        return out, "read"

    def _account(self, waits: list[_Wait], result: tuple[list[Any], str]) -> None:
        answers, outcome = result
        source = self.source
        if outcome == "refused":
            return
        if outcome != "read":
            source.unavailable += len(waits)
            if outcome == "failed_fast":
                return
        now = perf_counter()
        observe = source.latency.observe
        for w, r in zip(waits, answers, strict=True):
            observe(now - w.t0)
            if outcome == "read":
                if type(r) is torch.Tensor:
                    source.ok += 1
                else:
                    source.unknown += 1


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _strip_secret(text: str) -> str:
    """A Redis connection string without its password (``host:port,password=...,ssl=true``)."""
    return ",".join(p for p in str(text).split(",") if p and not p.startswith(("password=", "username=")))
