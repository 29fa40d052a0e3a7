"""The optional Zenoh queryable, for real: eclipse-zenoh sessions in peer mode on loopback (no zenohd router:
none is obtainable here; the runtime's session listens on a TCP port and the querier connects to it)."""

from __future__ import annotations

import asyncio
import json

import torch
from conftest import IN, OUT, infer_body, make_engine
from mlflow_testserver import free_port
from sovereign_runtime.zenoh_bridge import ZenohBridge, zenoh_config


def test_zenoh_queryable_answers_inference(loaded, models):
    import zenoh

    port = free_port()
    engine = make_engine(
        loaded["mlflow_pt2"], zenoh_key_expr="sovereign/test/infer", zenoh_listen=f"tcp/127.0.0.1:{port}"
    )
    x = torch.randn(3, IN)

    def query(session, payload: bytes):
        replies = list(session.get("sovereign/test/infer", payload=payload, timeout=10))
        assert len(replies) == 1
        reply = replies[0]
        if reply.ok is not None:
            return "ok", json.loads(reply.ok.payload.to_bytes())
        return "err", json.loads(reply.err.payload.to_bytes())

    async def go():
        bridge = ZenohBridge(engine, engine.cfg)
        bridge.start(asyncio.get_running_loop())
        client_cfg = zenoh_config(engine.cfg)  # same mode; connect instead of listen
        client_cfg.insert_json5("listen/endpoints", "[]")
        client_cfg.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
        session = await asyncio.to_thread(zenoh.open, client_cfg)
        try:
            good = None
            for _ in range(50):  # the peers need a moment to exchange declarations
                replies = await asyncio.to_thread(
                    lambda: list(session.get("sovereign/test/infer", payload=infer_body(x), timeout=2))
                )
                if replies:
                    good = ("ok", json.loads(replies[0].ok.payload.to_bytes())) if replies[0].ok else ("err", None)
                    break
                await asyncio.sleep(0.1)
            bad = await asyncio.to_thread(query, session, b'{"inputs": [{"name": "input__0"}]}')
            junk = await asyncio.to_thread(query, session, b"\x00not json")
            bridge.withdraw()  # what SIGTERM does: no more answers from this color
            gone = await asyncio.to_thread(
                lambda: list(session.get("sovereign/test/infer", payload=infer_body(x), timeout=1))
            )
        finally:
            session.close()
            await bridge.stop()
        return good, bad, junk, gone

    good, bad, junk, gone = asyncio.run(go())
    assert good is not None and good[0] == "ok"
    (out,) = good[1]["outputs"]
    assert out["shape"] == [3, OUT]
    assert torch.allclose(torch.tensor(out["data"]).reshape(3, OUT), models.expected(x), atol=1e-6)
    assert bad[0] == "err" and bad[1]["status"] == 400 and "datatype" in bad[1]["error"]
    assert junk[0] == "err" and junk[1]["status"] == 400 and "not valid JSON" in junk[1]["error"]
    assert gone == []
    assert engine.metrics.requests[("zenoh_infer", 200)] >= 1


def test_only_the_live_color_answers_the_shared_key(loaded, tmp_path):
    """The live map decides: the shared key is answered only while the map names this color; the host key always."""
    import zenoh

    port = free_port()
    live_map = tmp_path / "live.map"
    live_map.write_text("live green\n")
    engine = make_engine(
        loaded["mlflow_pt2"],
        color="blue",
        zenoh_key_expr="sovereign/test/{model}",
        zenoh_host_key_expr="sovereign/test/{model}/host/h1/{color}",
        zenoh_live_map=str(live_map),
        zenoh_listen=f"tcp/127.0.0.1:{port}",
    )
    x = torch.randn(1, IN)

    async def answered(session, key: str, want: bool) -> bool:
        for _ in range(40):  # declarations travel asynchronously
            replies = await asyncio.to_thread(lambda: list(session.get(key, payload=infer_body(x), timeout=1)))
            if bool(replies) == want:
                return want
            await asyncio.sleep(0.1)
        return not want

    async def go():
        bridge = ZenohBridge(engine, engine.cfg)
        bridge.start(asyncio.get_running_loop())
        model = engine.model.name
        client_cfg = zenoh.Config()
        client_cfg.insert_json5("mode", '"peer"')
        client_cfg.insert_json5("scouting/multicast/enabled", "false")
        client_cfg.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
        session = await asyncio.to_thread(zenoh.open, client_cfg)
        shared, host = f"sovereign/test/{model}", f"sovereign/test/{model}/host/h1/blue"
        try:
            steps = [
                ("host key while idle", await answered(session, host, True)),
                ("shared key silent while idle", not await answered(session, shared, False)),
            ]
            live_map.write_text("live blue\n")
            steps.append(("shared key after the switch to blue", await answered(session, shared, True)))
            live_map.write_text("live green\n")
            steps.append(("shared key silent after the switch back", not await answered(session, shared, False)))
            steps.append(("host key still answered", await answered(session, host, True)))
        finally:
            session.close()
            await bridge.stop()
        return steps

    steps = asyncio.run(go())
    assert all(ok for _, ok in steps), steps


def test_bus_down_at_start_never_fails_the_runtime(loaded):
    """No router yet: the bridge keeps retrying in the background (HTTP is not held up), and answers once a router
    (a real one: eclipse-zenoh in mode router) comes up on the configured endpoint."""
    import zenoh

    port = free_port()
    endpoint = f"tcp/127.0.0.1:{port}"
    engine = make_engine(
        loaded["mlflow_pt2"], zenoh_key_expr="sovereign/test/late", zenoh_mode="client", zenoh_connect=endpoint
    )
    x = torch.randn(1, IN)

    def router_config():
        conf = zenoh.Config()
        conf.insert_json5("mode", '"router"')
        conf.insert_json5("listen/endpoints", json.dumps([endpoint]))
        conf.insert_json5("scouting/multicast/enabled", "false")
        return conf

    async def go():
        bridge = ZenohBridge(engine, engine.cfg)
        bridge.start(asyncio.get_running_loop())  # returns at once although nothing listens yet
        await asyncio.sleep(1.5)
        router = await asyncio.to_thread(zenoh.open, router_config())
        client_cfg = zenoh.Config()
        client_cfg.insert_json5("mode", '"client"')
        client_cfg.insert_json5("connect/endpoints", json.dumps([endpoint]))
        session = await asyncio.to_thread(zenoh.open, client_cfg)
        answered = False
        try:
            for _ in range(100):  # the bridge's back-off is 1, 2, 4 s
                replies = await asyncio.to_thread(
                    lambda: list(session.get("sovereign/test/late", payload=infer_body(x), timeout=1))
                )
                if replies and replies[0].ok is not None:
                    answered = True
                    break
                await asyncio.sleep(0.1)
        finally:
            session.close()
            await bridge.stop()
            router.close()
        return answered

    assert asyncio.run(go())
