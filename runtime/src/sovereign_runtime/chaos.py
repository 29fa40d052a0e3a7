"""Chaos knobs, for tests only (rollback and smoke tests make a color degrade on purpose).

:func:`install` wraps one engine's ``infer`` when ``--chaos-latency-ms`` or ``--chaos-error-rate`` is
set; otherwise nothing here is imported and the production ``infer`` has no chaos branch at all.

* Latency: every infer request first waits this long without blocking the loop, counted as admitted
  (so a slow color fills its queue: 503 when ``--max-queue-size`` requests are already waiting) and
  inside its request timeout (the deadline runs from arrival, so the wait can provoke 504s).
* Error rate: that fraction of the requests that would have been answered 200 get 500
  ``{"error": "chaos: ...", "chaos": true}`` instead, counted in ``chaos_injected_total``.
"""

from __future__ import annotations

import asyncio
import random

from .engine import RETRY_AFTER, Engine
from .protocol import error_body


def install(engine: Engine) -> None:
    cfg = engine.cfg
    latency = cfg.chaos_latency_ms / 1000.0
    rate = cfg.chaos_error_rate
    infer = engine.infer  # the production method, bound

    async def chaos_infer(body: bytes, t0: float) -> tuple[int, bytes, list | None]:
        if latency:
            if engine.waiting >= engine.max_waiting:
                return 503, error_body(f"queue full ({engine.max_waiting} requests waiting)"), RETRY_AFTER
            engine.waiting += 1
            try:
                await asyncio.sleep(latency)
            finally:
                engine.waiting -= 1
        status, payload, headers = await infer(body, t0)
        if status == 200 and rate and random.random() < rate:
            engine.metrics.chaos_injected += 1
            return 500, error_body("chaos: injected failure (--chaos-error-rate)", chaos=True), None
        return status, payload, headers

    engine.infer = chaos_infer  # type: ignore[method-assign]
