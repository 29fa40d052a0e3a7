"""sovereign-ops' Zenoh commands against a real router: the role's own helper (roles/zenoh_router/files/
sovereign_zenoh.py router) in mode router with usrpwd and a default-deny ACL, on loopback, and a queryable
session with runtime credentials standing in for a runtime (the runtime itself is tested in molecule zenoh)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port
from sovereign_ops import bus, inventory

HELPER = Path(__file__).resolve().parents[3] / "roles" / "zenoh_router" / "files" / "sovereign_zenoh.py"
USERS = {
    "sovereign-runtime": "runtime-pw-123456",
    "sovereign-client": "client-pw-123456",
    "sovereign-monitor": "monitor-pw-123456",
}


def _rule(rid, flows, messages, keys):
    return {"id": rid, "permission": "allow", "flows": flows, "messages": messages, "key_exprs": keys}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    d = tmp_path_factory.mktemp("zenoh")
    port = free_port()
    (d / "users.txt").write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    infer = ["sovereign/infer", "sovereign/infer/**"]
    config = {
        "mode": "router",
        "id": "abc123",
        "listen": {"endpoints": [f"tcp/127.0.0.1:{port}"]},
        "scouting": {"multicast": {"enabled": False}},
        "adminspace": {"enabled": True, "permissions": {"read": True, "write": False}},
        "transport": {"auth": {"usrpwd": {"dictionary_file": str(d / "users.txt")}}},
        "access_control": {
            "enabled": True,
            "default_permission": "deny",
            "rules": [
                _rule("serve", ["ingress"], ["declare_queryable", "reply"], infer),
                _rule("serve_q", ["egress"], ["query"], infer),
                _rule("ask", ["ingress"], ["query"], infer),
                _rule("ask_r", ["egress"], ["reply"], infer),
                _rule("admin", ["ingress", "egress"], ["query", "reply"], ["@/**"]),
            ],
            "subjects": [
                {"id": "rt", "usernames": ["sovereign-runtime"]},
                {"id": "cl", "usernames": ["sovereign-client", "sovereign-monitor"]},
                {"id": "mon", "usernames": ["sovereign-monitor"]},
            ],
            "policies": [
                {"rules": ["serve", "serve_q"], "subjects": ["rt"]},
                {"rules": ["ask", "ask_r"], "subjects": ["cl"]},
                {"rules": ["admin"], "subjects": ["mon"]},
            ],
        },
    }
    (d / "router.json5").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "router", str(d / "router.json5")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ep = f"tcp/127.0.0.1:{port}"
    for _ in range(100):
        if bus._reachable(ep, 0.2):
            break
        time.sleep(0.1)
    rt = bus.open_session([ep], "sovereign-runtime", USERS["sovereign-runtime"])
    q = rt.declare_queryable("sovereign/infer/demo", lambda query: query.reply("sovereign/infer/demo", b'{"y": 1}'))
    time.sleep(0.5)
    try:
        yield ep
    finally:
        q.undeclare()
        rt.close()
        proc.terminate()
        proc.wait(10)


def test_infer_through_the_router(router):
    replies, ms = bus.infer([router], "sovereign-client", USERS["sovereign-client"], "sovereign/infer/demo", b"{}")
    assert replies == [(True, {"y": 1})] and ms > 0


def test_wrong_password_is_named(router):
    with pytest.raises(inventory.InventoryError, match="refused the session for user 'sovereign-client': wrong"):
        bus.open_session([router], "sovereign-client", "not-it-at-all", timeout_ms=1000)


def test_no_router_is_named():
    with pytest.raises(inventory.InventoryError, match="no Zenoh router reachable"):
        bus.open_session([f"tcp/127.0.0.1:{free_port()}"], "u", "p", timeout_ms=500)


def test_bus_lists_router_sessions_and_queryables(router):
    data = bus.listing([router], "sovereign-monitor", USERS["sovereign-monitor"])
    assert [r["zid"] for r in data["routers"]] == ["abc123"]
    assert data["routers"][0]["sessions"] == {"client": 1}  # the runtime; the listing's own session excluded
    assert list(data["queryables"]) == ["sovereign/infer/demo"]
    assert "sovereign/infer/demo" in bus.format_listing(data)


def test_endpoints_and_credentials_from_the_inventory():
    hosts = {
        "zr-01": inventory.Host("zr-01", {"ansible_host": "10.0.0.5"}, {"all", "zenoh_routers"}),
        "inf-01": inventory.Host("inf-01", {"sovereign_zenoh_client_password": "pw"}, {"all", "inference"}),
    }
    inv = inventory.Inventory(hosts=hosts, groups={"all"}, notes=[])
    assert bus.endpoints(inv) == ["tcp/10.0.0.5:7447"]
    assert bus.credentials(inv, "client") == ("sovereign-client", "pw")
    with pytest.raises(inventory.InventoryError, match="sovereign_zenoh_monitor_password is not in the inventory"):
        bus.credentials(inv, "monitor")
    hosts["inf-01"].vars["sovereign_zenoh_connect"] = ["tcp/127.0.0.1:17447"]
    assert bus.endpoints(inv) == ["tcp/127.0.0.1:17447"]
