"""Dynamic batching, admission and timeouts, through the ASGI app with concurrent requests."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import IN, OUT, infer_body, make_engine

INFER = "/v2/models/mlp/infer"


def rows_of(resp) -> torch.Tensor:
    (out,) = resp.json()["outputs"]
    return torch.tensor(out["data"]).reshape(out["shape"])


@pytest.mark.parametrize("max_batch", [16, 1], ids=["batched", "inline"])
def test_concurrent_requests_get_their_own_rows(loaded, models, client_for, max_batch):
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=max_batch)
    client = client_for(engine)
    torch.manual_seed(1)
    inputs = [torch.randn(1 + i % 3, IN) for i in range(12)]  # 24 rows: more than one batch of 16

    async def go():
        return await asyncio.gather(*(client.post(INFER, infer_body(x, id=str(i))) for i, x in enumerate(inputs)))

    responses = asyncio.run(go())
    for i, (x, resp) in enumerate(zip(inputs, responses, strict=True)):
        assert resp.status == 200 and resp.json()["id"] == str(i)
        assert torch.allclose(rows_of(resp), models.expected(x), atol=1e-6)
    hist = engine.metrics.batch_size
    batches = sum(hist.counts)
    if max_batch > 1:
        assert batches < len(inputs)  # requests that arrived together shared forwards
        assert hist.total == 24 and max(b for b, n in zip((*hist.bounds, 1e9), hist.counts, strict=True) if n) <= 16
    else:
        assert batches == len(inputs)


def test_lone_request_is_not_held_for_the_batch_delay(loaded, client_for):
    """With a long max_batch_delay, a request alone is still answered at once (no timer wait)."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=16, max_batch_delay_ms=60_000)
    client = client_for(engine)

    async def go():
        return await asyncio.wait_for(client.post(INFER, infer_body(torch.zeros(1, IN))), timeout=30)

    assert asyncio.run(go()).status == 200


def test_batch_delay_gathers_under_concurrency(loaded, client_for):
    """After a batch of several, the next requests wait (up to the delay) to form a batch as large."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=8, max_batch_delay_ms=30_000)
    client = client_for(engine)

    async def go():
        await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(4)))
        first = asyncio.create_task(client.post(INFER, infer_body(torch.ones(1, IN))))
        await asyncio.sleep(0.05)
        held = not first.done()  # waiting for company, not for the 30 s timer to fire...
        rest = [client.post(INFER, infer_body(torch.ones(1, IN))) for _ in range(3)]
        done = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=20)  # ...released by the 4th
        return held, done

    held, done = asyncio.run(go())
    assert held
    assert all(r.status == 200 for r in done)
    assert engine.metrics.batch_size.counts[engine.metrics.batch_size.bounds.index(4)] == 2


@pytest.mark.parametrize("max_batch", [8, 1], ids=["batched", "inline"])
def test_queue_full_503_retry_after(loaded, client_for, max_batch):
    # Inline requests never queue, so hold them with the chaos latency knob to fill admission.
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=max_batch, max_queue_size=2, chaos_latency_ms=50)
    client = client_for(engine)

    async def go():
        return await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(5)))

    statuses = sorted(r.status for r in asyncio.run(go()))
    assert statuses == [200, 200, 503, 503, 503]
    full = [r for r in asyncio.run(go()) if r.status == 503]
    assert full[0].headers[b"retry-after"] == b"1" and "queue full" in full[0].json()["error"]
    assert engine.waiting == 0


@pytest.mark.parametrize("max_batch", [8, 1], ids=["batched", "inline"])
def test_timeout_504(loaded, client_for, max_batch):
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=max_batch, request_timeout_s=0.05, chaos_latency_ms=300)
    resp = asyncio.run(client_for(engine).post(INFER, infer_body(torch.zeros(1, IN))))
    assert resp.status == 504 and "timed out" in resp.json()["error"]
    assert engine.waiting == 0


def test_expired_in_queue_504_without_compute(loaded, client_for):
    """A request whose deadline passes while queued behind a slow batch is answered 504, not computed."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=2, request_timeout_s=0.2)
    real_forward = engine.forward

    def slow_forward(tensors):
        import time

        time.sleep(0.5)  # a forward that blocks the loop longer than the timeout
        return real_forward(tensors)

    engine.forward = slow_forward
    client = client_for(engine)

    async def go():
        return await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(4)))

    statuses = [r.status for r in asyncio.run(go())]
    assert statuses[:2] == [200, 200] and statuses[2:] == [504, 504]


def test_chaos_error_rate(loaded, client_for):
    engine = make_engine(loaded["mlflow_pt2"], chaos_error_rate=1.0)
    resp = asyncio.run(client_for(engine).post(INFER, infer_body(torch.zeros(1, IN))))
    assert resp.status == 500 and resp.json()["chaos"] is True and "chaos" in resp.json()["error"]
    assert engine.metrics.chaos_injected == 1
    bad = asyncio.run(client_for(engine).post(INFER, b"{"))
    assert bad.status == 400  # validation first: chaos only hits valid requests


def test_one_failing_request_does_not_fail_its_batch(models, client_for, tmp_path):
    """A model that raises on some inputs: the culprit gets a 4xx, its batch neighbours their rows."""
    from sovereign_runtime.model import load

    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = models.module

        def forward(self, x):
            if bool((x > 100).any()):
                raise ValueError("values above 100 are not supported")
            return self.inner(x)

    path = tmp_path / "picky.ts"
    torch.jit.script(Picky()).save(str(path))
    golden = models.golden()
    (tmp_path / "picky.ts.golden.json").write_text(__import__("json").dumps(golden))
    engine = make_engine(load(str(path)), max_batch_size=8)
    client = client_for(engine)
    xs = [torch.zeros(1, IN), torch.full((1, IN), 1000.0), torch.ones(2, IN)]

    async def go():
        return await asyncio.gather(*(client.post("/v2/models/picky/infer", infer_body(x)) for x in xs))

    ok1, bad, ok2 = asyncio.run(go())
    assert bad.status == 400 and "values above 100" in bad.json()["error"]
    assert torch.allclose(rows_of(ok1), models.expected(xs[0]), atol=1e-6)
    assert rows_of(ok2).shape == (2, OUT)


@pytest.mark.parametrize(("busy", "queued"), [(1, False), (3, True), (None, True)])
def test_lone_request_skips_the_queue(loaded, client_for, busy, queued):
    """In the server, engine.busy counts the HTTP requests being handled: alone (1), a request runs
    inline exactly as with batching off; with company (or unknown), it goes through the batch queue."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=16)
    engine.busy = (lambda: busy) if busy else None
    used = []
    real = engine._enqueue
    engine._enqueue = lambda item, loop: (used.append(item), real(item, loop))
    resp = asyncio.run(client_for(engine).post(INFER, infer_body(torch.zeros(1, IN))))
    assert resp.status == 200 and bool(used) is queued


def test_cancelled_queued_request_is_counted_once(loaded, client_for):
    """A handler cancelled while its request waits in the queue (shutdown timeout) leaves the counters right."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=8, max_batch_delay_ms=300)
    client = client_for(engine)

    async def go():
        await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(3)))
        waiting = asyncio.create_task(client.post(INFER, infer_body(torch.zeros(1, IN))))  # held by the delay
        await asyncio.sleep(0.05)
        queued = (engine.waiting, len(engine._queue))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        after_cancel = engine.waiting
        await asyncio.sleep(0.5)  # the delay timer fires and finds the abandoned item
        return (
            queued,
            after_cancel,
            engine.waiting,
            len(engine._queue),
            await client.post(INFER, infer_body(torch.zeros(1, IN))),
        )

    queued, after_cancel, after_flush, left, resp = asyncio.run(go())
    assert queued == (1, 1) and after_cancel == 0 and after_flush == 0 and left == 0
    assert resp.status == 200 and engine.waiting == 0


def test_chaos_is_a_wrapper_installed_only_when_asked(loaded):
    import inspect

    from sovereign_runtime.engine import Engine

    plain = make_engine(loaded["mlflow_pt2"])
    assert "infer" not in vars(plain)  # the class's own infer: the production path
    assert "chaos" not in inspect.getsource(Engine.infer)  # and it has no chaos branch
    chaotic = make_engine(loaded["mlflow_pt2"], chaos_latency_ms=1)
    assert vars(chaotic)["infer"].__module__ == "sovereign_runtime.chaos"


def test_batch_waits_for_every_active_client(loaded, client_for):
    """ADR 1704: clients answered by one batch come back a round trip later; a batch formed without them
    splits the clients into cohorts that never merge (3 + 2 + 11 rows of 16 clients, run after run). With
    a delay, the next batch waits for as many requests as there are active clients (the server counts
    its connections: engine.clients), not just as many as the last batch held, and a request of a
    concurrent client does not take the inline path even when it is momentarily alone."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=16, max_batch_delay_ms=30_000)
    client = client_for(engine)

    async def go():
        await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(3)))  # batch of 3
        engine.busy = lambda: 1  # each request below is alone in the server when it arrives...
        engine.clients = lambda since: 8  # ...but 8 clients are active
        first = [asyncio.create_task(client.post(INFER, infer_body(torch.ones(1, IN)))) for _ in range(5)]
        await asyncio.sleep(0.05)
        held = not any(t.done() for t in first)  # 5 > the last batch's 3: still waiting for all 8
        rest = [client.post(INFER, infer_body(torch.ones(1, IN))) for _ in range(3)]
        done = await asyncio.wait_for(asyncio.gather(*first, *rest), timeout=20)  # released by the 8th
        return held, done

    held, done = asyncio.run(go())
    assert held
    assert all(r.status == 200 for r in done)
    hist = engine.metrics.batch_size
    assert hist.counts[hist.bounds.index(8)] == 1 and sum(hist.counts) == 2


def test_batch_wait_ends_at_the_delay_when_clients_stay_away(loaded, client_for):
    """Fewer requests than active clients: the batch still goes when the delay is up."""
    engine = make_engine(loaded["mlflow_pt2"], max_batch_size=16, max_batch_delay_ms=50)
    client = client_for(engine)

    async def go():
        await asyncio.gather(*(client.post(INFER, infer_body(torch.zeros(1, IN))) for _ in range(3)))
        engine.clients = lambda since: 16
        return await asyncio.wait_for(client.post(INFER, infer_body(torch.ones(1, IN))), timeout=20)

    assert asyncio.run(go()).status == 200
