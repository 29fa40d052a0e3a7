"""Fetching a model through MLflow (``models:/`` and other remote URIs) on a bounded, stated retry schedule,
and saying *why* the tracking server could not be reached (host, port, cause) instead of "loading".

MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with a growing back-off, and a
120 s ``MLFLOW_HTTP_REQUEST_TIMEOUT``) are switched off while fetching: one schedule, the runtime's, is in
force, and every failed attempt is visible (journal and ``/v2/health/ready``) as it happens.

Schedule (``--registry-attempts`` N, default 6; ``--registry-timeout-s`` T, default 10): up to N attempts,
waiting 1, 2, 4, 8, 15, 15, ... s between them (doubling, capped at 15 s): 30 s of waiting in all for the
default N. Each HTTP request of an attempt gives up after T s without an answer (connect or read; a
download that keeps streaming is not cut). Only causes that can clear by themselves are retried: name
resolution, connection refused/reset, timeouts, HTTP 429 and 5xx. Refused credentials (HTTP 401/403), an
unknown model, version or alias, and TLS errors fail at once: waiting would not fix them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_DELAY_S = 15.0
_sleep = time.sleep  # looked up at each wait (tests record the waits instead of waiting)
# MLflow's text for a non-JSON error response; urllib3's when a retryable status used up its retries (0).
_STATUS_IN_TEXT = re.compile(r"error code (\d{3})|too many (\d{3}) error responses")


class RegistryError(Exception):
    """The tracking server could not be reached, or refused the credentials; the message names host, port
    and cause, ``fields`` carries them for the log."""

    def __init__(self, message: str, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class Schedule:
    attempts: int = 6
    timeout_s: float = 10.0

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed: 1, 2, 4, 8, 15, 15, ..."""
        return min(2.0 ** (failed_attempt - 1), MAX_DELAY_S)

    def total_wait_s(self) -> float:
        return sum(self.delay(n) for n in range(1, self.attempts))


@dataclass(frozen=True)
class Cause:
    text: str  # e.g. "name resolution failed ([Errno -2] Name or service not known)"
    transient: bool  # worth another attempt
    kind: str  # resolve | refused | timeout | network | tls | auth | http


def endpoint(tracking_uri: str | None) -> str:
    """``host:port`` of the tracking server, for messages (the URI itself when it has no host)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    parts = urlsplit(uri)
    if not parts.hostname:
        return uri or "(no tracking URI set)"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return uri
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps: MLflow re-raises requests' errors as text, but keeps the
    original as ``__context__``; requests and urllib3 keep theirs in ``args`` / ``reason`` / ``__cause__``."""
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack.extend((item.__cause__, item.__context__, getattr(item, "reason", None)))
        stack.extend(a for a in item.args if isinstance(a, BaseException))


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)  # requests.HTTPError (artifact downloads)
    if isinstance(getattr(response, "status_code", None), int):
        return response.status_code
    code = getattr(exc, "error_code", None)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return 401 if code == "UNAUTHENTICATED" else 403
    m = _STATUS_IN_TEXT.search(str(exc))
    if m:
        return int(m.group(1) or m.group(2))
    if type(exc).__name__ == "RestException" and hasattr(exc, "get_http_status_code"):
        return int(exc.get_http_status_code())
    return None


def diagnose(exc: BaseException, timeout_s: float) -> Cause | None:
    """Why MLflow could not talk to its server; None when the server answered and the error is about the
    request itself (unknown model, version or alias, ...)."""
    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, socket.gaierror):
            return Cause(f"name resolution failed ({item.strerror or item})", True, "resolve")
    for item in chain:
        if isinstance(item, ssl.SSLError):
            return Cause(f"TLS error ({item})", False, "tls")
        if isinstance(item, ConnectionRefusedError):
            return Cause("connection refused (nothing listens there)", True, "refused")
    for item in chain:
        name = type(item).__name__
        if isinstance(item, TimeoutError) or name in ("Timeout", "ReadTimeout", "ConnectTimeout", "ReadTimeoutError"):
            return Cause(f"no answer within {timeout_s:g} s", True, "timeout")
    # The server answered with an HTTP error (requests' HTTPError is an OSError too: look at it first).
    for item in chain:
        status = _http_status(item)
        if status in (401, 403):
            what = "refused the credentials" if status == 401 else "denied access"
            return Cause(
                f"HTTP {status}: the server {what} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)", False, "auth"
            )
        if status is not None and (status >= 500 or status == 429):
            return Cause(f"HTTP {status} from the server", True, "http")
        if status is not None:
            return None  # 404 and the like: about the request, not the server
    for item in chain:
        if isinstance(item, OSError):
            return Cause(f"network error ({item})", True, "network")
    return None


@contextlib.contextmanager
def mlflow_http_settings(schedule: Schedule) -> Iterator[None]:
    """MLflow reads these at each request: no retries of its own, our per-request timeout."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(schedule.timeout_s))),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def with_retries(
    attempt: Callable[[], Any],
    tracking_uri: str | None,
    schedule: Schedule,
    on_retry: Callable[[str, dict[str, Any]], None] | None = None,
) -> Any:
    """Run ``attempt`` (one whole resolve + download) until it succeeds, fails for a reason a retry cannot
    fix, or the schedule is spent. Raises :class:`RegistryError` when the server could not be reached or
    refused the credentials; re-raises MLflow's own error when the server answered (unknown model, ...).
    ``on_retry(reason, fields)`` hears of every failed attempt that will be retried (the server shows
    ``reason`` on /v2/health/ready and logs ``registry_unreachable``)."""
    where = endpoint(tracking_uri)
    started = time.monotonic()
    for n in range(1, schedule.attempts + 1):
        try:
            with mlflow_http_settings(schedule):
                return attempt()
        except Exception as exc:  # mlflow raises many types (REST, connection, not found)
            cause = diagnose(exc, schedule.timeout_s)
            if cause is None:  # the server answered: the request itself is wrong (the caller words it)
                raise
            fields = {"tracking_server": where, "cause": cause.kind, "attempt": n, "attempts": schedule.attempts}
            if not cause.transient:
                raise RegistryError(f"MLflow tracking server {where}: {cause.text}", fields) from None
            if n == schedule.attempts:
                spent = time.monotonic() - started
                fields["seconds"] = round(spent, 1)
                raise RegistryError(
                    f"cannot reach the MLflow tracking server {where}: {cause.text}; gave up after "
                    f"{n} attempt{'s' if n > 1 else ''} in {spent:.0f} s",
                    fields,
                ) from None
            delay = schedule.delay(n)
            fields["retry_in_s"] = delay
            if on_retry is not None:
                on_retry(
                    f"cannot reach the MLflow tracking server {where}: {cause.text}; attempt {n} of "
                    f"{schedule.attempts} failed, next in {delay:g} s",
                    fields,
                )
            _sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
