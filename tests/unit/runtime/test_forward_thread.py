"""The forward thread (ADR 1716): once a forward has taken at least OFFLOAD_SECONDS, the next forwards run on the
engine's one forward thread, the loop stays free meanwhile, and the requests that arrive during a forward form the
next batch, whichever frontend submitted them (HTTP's direct path: ``submit``; gRPC and ASGI: ``run``). A lone
HTTP request still runs inline; a lone-looking gRPC call does not (``run(alone_inline=False)``). A real model
and engine; the slow forward is the real one after a sleep (a heavy model, without its CPU cost)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import IN, infer_body, make_engine
from sovereign_runtime import engine as engine_module
from sovereign_runtime.protocol import DecodedRequest

SLOW = 0.02  # seconds per forward: far past OFFLOAD_SECONDS


def slow_engine(loaded, **overrides):
    """An engine whose forwards sleep SLOW first and record (thread name, rows); its last forward was slow."""
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp", **overrides)
    calls: list[tuple[str, int]] = []
    real = engine.forward

    def forward(tensors):
        calls.append((threading.current_thread().name, int(tensors[0].shape[0])))
        time.sleep(SLOW)
        return real(tensors)

    engine.forward = forward
    engine._forward_seconds = SLOW  # as after one slow forward
    return engine, calls, real


async def started(engine) -> None:
    """Turn the loop until a forward runs on the forward thread."""
    for _ in range(10):
        if engine._forward_busy:
            return
        await asyncio.sleep(0)
    raise AssertionError("no forward started on the forward thread")


def request(value: float) -> DecodedRequest:
    return DecodedRequest(None, [torch.full((1, IN), value)], 1, None)


def test_calls_arriving_during_a_forward_form_the_next_batch(loaded):
    """gRPC's way in (``run(alone_inline=False)``): call a, alone, still runs on the forward thread; b, c and d
    arrive on later loop turns while it runs (the loop is not blocked: they are submitted during a's forward) and
    share the next forward there; each gets its own rows."""
    engine, calls, real = slow_engine(loaded)

    async def go():
        loop_turns = 0
        first = asyncio.ensure_future(engine.run(request(0.0), time.perf_counter(), alone_inline=False))
        await started(engine)  # a's flush: its forward starts on the thread
        others = []
        for value in (1.0, 2.0, 3.0):
            others.append(asyncio.ensure_future(engine.run(request(value), time.perf_counter(), alone_inline=False)))
            await asyncio.sleep(SLOW / 10)
            loop_turns += 1
        busy_after = engine._forward_busy
        results = await asyncio.gather(first, *others)
        return loop_turns, busy_after, results

    turns, busy_after, results = asyncio.run(go())
    assert turns == 3 and busy_after  # b, c, d were submitted while a's forward ran
    assert [(name.split("_")[0], rows) for name, rows in calls] == [("forward", 1), ("forward", 3)]
    for value, got in zip((0.0, 1.0, 2.0, 3.0), results, strict=True):
        want = real([torch.full((1, IN), value)])
        assert all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(("max_batch", "alone_inline"), [(1, False), (16, True)])
def test_a_lone_request_runs_inline_on_the_loop(loaded, max_batch, alone_inline):
    """No hop where nothing can share the forward: batching off (every gRPC call inline, as before), or an HTTP
    request that is alone (``alone_inline``, the default), even after a slow forward."""
    engine, calls, _ = slow_engine(loaded, max_batch_size=max_batch)
    engine.busy = lambda: 1

    async def go():
        return await engine.run(request(0.0), time.perf_counter(), alone_inline=alone_inline)

    assert type(asyncio.run(go())) is list
    assert [name for name, _ in calls] == ["MainThread"] and engine._pool is None


def test_the_direct_path_queues_behind_the_forward_thread(loaded):
    """HTTP's direct path (``submit``): a lone request after a slow forward runs inline (answered inside
    data_received); one that arrives while a batch is on the forward thread joins the queue and is answered from
    the loop when the next forward, on the thread too, is done."""
    engine, calls, _ = slow_engine(loaded)
    engine.clients = lambda since: 1  # a lone client
    answered: list[tuple[int, str]] = []
    body = infer_body(torch.ones(1, IN))

    def done(status, _body, _headers):
        answered.append(status)

    async def go():
        engine.submit(body, None, time.perf_counter(), done)
        inline = list(answered)
        grpc_call = asyncio.ensure_future(engine.run(request(0.0), time.perf_counter(), alone_inline=False))
        await started(engine)
        engine.submit(body, None, time.perf_counter(), done)
        behind = list(answered)
        await grpc_call
        for _ in range(100):
            if len(answered) == 2:
                break
            await asyncio.sleep(SLOW / 4)
        return inline, behind

    inline, behind = asyncio.run(go())
    assert inline == [200] and behind == [200] and answered == [200, 200]
    assert [name.split("_")[0] for name, _ in calls] == ["MainThread", "forward", "forward"]


def test_a_short_forward_brings_the_loop_path_back(loaded):
    """Offloading follows the last forward: after a forward on the thread that took less than OFFLOAD_SECONDS (the
    real light model), the next gRPC call runs inline on the loop again."""
    engine = make_engine(loaded["mlflow_pt2"], model_name="mlp")
    engine.busy = lambda: 1
    engine._forward_seconds = engine_module.OFFLOAD_SECONDS  # the last forward was slow
    threads: list[str] = []
    real = engine.forward

    def forward(tensors):
        threads.append(threading.current_thread().name.split("_")[0])
        return real(tensors)

    engine.forward = forward

    async def go():
        for value in (0.0, 1.0):
            assert type(await engine.run(request(value), time.perf_counter(), alone_inline=False)) is list

    asyncio.run(go())
    assert engine._forward_seconds < engine_module.OFFLOAD_SECONDS  # the real forward: microseconds
    assert threads == ["forward", "MainThread"]


def test_a_request_cancelled_during_its_forward_leaves_the_others_answered(loaded):
    """A request whose handler is cancelled (server shutdown) while its batch runs on the forward thread: the
    batch's other requests are still answered, and the loop reports no error setting the cancelled one's result."""
    engine, _, _ = slow_engine(loaded)
    loop_errors: list[dict] = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        first = asyncio.ensure_future(engine.run(request(0.0), time.perf_counter(), alone_inline=False))
        await started(engine)
        kept = asyncio.ensure_future(engine.run(request(1.0), time.perf_counter(), alone_inline=False))
        gone = asyncio.ensure_future(engine.run(request(2.0), time.perf_counter(), alone_inline=False))
        await asyncio.sleep(SLOW * 1.5)  # first's forward is done; kept and gone are on the thread now
        assert engine._forward_busy
        gone.cancel()
        results = await asyncio.gather(first, kept, gone, return_exceptions=True)
        await asyncio.sleep(SLOW)
        return results

    first, kept, gone = asyncio.run(go())
    assert type(first) is list and type(kept) is list and isinstance(gone, asyncio.CancelledError)
    assert loop_errors == [] and engine.waiting == 0


def test_a_bug_on_the_forward_thread_answers_500_and_the_engine_goes_on(loaded):
    """An exception that is not the model's (raised outside the per-request fallback: a bug) fails that batch's
    requests with 500 naming it; the next request is served."""
    engine, _, _ = slow_engine(loaded)
    real_results = engine._batch_results
    broken = [True]

    def batch_results(batch, rows):
        if broken.pop() if broken else False:
            raise RuntimeError("boom")
        return real_results(batch, rows)

    engine._batch_results = batch_results

    async def go():
        failed = await engine.run(request(0.0), time.perf_counter(), alone_inline=False)
        served = await engine.run(request(1.0), time.perf_counter(), alone_inline=False)
        return failed, served

    failed, served = asyncio.run(go())
    assert failed == (500, "internal error running the model: RuntimeError", None)
    assert type(served) is list and engine.waiting == 0
