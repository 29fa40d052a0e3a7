# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""blue_green_switch against a real haproxy (the role's template, rendered) and real HTTP backends."""

from __future__ import annotations

import http.client
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.modules import blue_green_switch
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    Backend,
    HAProxy,
    LiarServer,
    needs_haproxy,
    render_haproxy_cfg,
    run_module,
    template_vars,
    warnings,
)
from ports import free_port

pytestmark = needs_haproxy


class Env:
    """haproxy + blue and green backends on loopback high ports, in a short temp dir."""

    def __init__(
        self,
        live="blue",
        file_live=None,
        blue_healthy=True,
        green_healthy=True,
        haproxy_green_port=None,
        master_worker=False,
    ):
        self.dir = tempfile.mkdtemp(prefix="bgs-", dir="/tmp")
        self.blue = Backend("blue", healthy=blue_healthy).start()
        self.green = Backend("green", healthy=green_healthy).start()
        self.frontend_port = free_port()
        self.map_file = os.path.join(self.dir, "live.map")
        self.lock_path = os.path.join(self.dir, "lock", "switch.lock")
        colors = {"blue": {"port": self.blue.port}, "green": {"port": haproxy_green_port or self.green.port}}
        values = template_vars(pathlib.Path(self.dir), self.frontend_port, free_port(), colors)
        self.cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(self.cfg, "w") as handle:
            handle.write(render_haproxy_cfg(values))
        self.admin_socket = values["traffic_switch_admin_socket"]
        self.write_map(live)
        self.haproxy = HAProxy(self.cfg, self.admin_socket, master_worker=master_worker)
        self.haproxy.start()
        if file_live is not None:
            self.write_map(file_live)  # the file says something else than the running HAProxy

    def write_map(self, color):
        with open(self.map_file, "w") as handle:
            handle.write(f"# live color\nlive {color}\n")

    def args(self, color, **extra):
        args = dict(
            color=color,
            admin_socket=self.admin_socket,
            map_file=self.map_file,
            colors={"blue": {"port": self.blue.port}, "green": {"port": self.green.port}},
            frontend_url=f"http://127.0.0.1:{self.frontend_port}",
            drain_timeout=10,
            confirm_timeout=3,
            lock_path=self.lock_path,
            lock_timeout=5,
        )
        args.update(extra)
        return args

    def runtime_color(self):
        out = self.haproxy.command(f"show map {self.map_file}").split()
        return out[2] if len(out) >= 3 else None

    def file_text(self):
        with open(self.map_file) as handle:
            return handle.read()

    def frontend_get(self, path="/"):
        conn = http.client.HTTPConnection("127.0.0.1", self.frontend_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("X-Sovereign-Color")
        finally:
            conn.close()

    def close(self):
        self.haproxy.stop()
        self.blue.stop()
        self.green.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def make_env():
    envs = []

    def make(**kwargs):
        env = Env(**kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _disable_green(env):
    env.haproxy.command("disable server be_green/green")
    env.haproxy.wait_status("green", "MAINT")


def _wait_up(env):
    env.haproxy.wait_status("blue", "UP", exact=True)
    env.haproxy.wait_status("green", "UP", exact=True)


def _wait_green_down(env):
    env.haproxy.wait_status("blue", "UP")
    env.haproxy.wait_status("green", "DOWN")


# id, env kwargs, prepare(env), target, module extras, check_mode, diff,
# expected: failed, changed, msg substring, runtime color after, file color after, extra result checks
CASES = [
    dict(
        id="switch-blue-to-green",
        target="green",
        prepare=_wait_up,
        failed=False,
        changed=True,
        runtime="green",
        file="green",
        result=dict(previous_color="blue", color="green", confirmed_requests=3, drained=True, target_status="UP"),
    ),
    dict(
        id="switch-green-to-blue",
        env=dict(live="green"),
        target="blue",
        prepare=_wait_up,
        failed=False,
        changed=True,
        runtime="blue",
        file="blue",
        result=dict(previous_color="green"),
    ),
    dict(
        id="already-live",
        target="blue",
        prepare=_wait_up,
        failed=False,
        changed=False,
        runtime="blue",
        file="blue",
        result=dict(previous_color="blue", switched_at=None, confirmed_requests=0),
    ),
    dict(
        id="already-live-file-disagrees",
        env=dict(live="green", file_live="blue"),
        target="green",
        prepare=_wait_up,
        failed=False,
        changed=True,
        runtime="green",
        file="green",
        warning="converging both to green",
        result=dict(previous_color="green", file_color="blue", switched_at=None),
    ),
    dict(
        id="runtime-disagrees-converges",
        env=dict(live="blue", file_live="green"),
        target="green",
        prepare=_wait_up,
        failed=False,
        changed=True,
        runtime="green",
        file="green",
        warning="routes to blue",
        result=dict(previous_color="blue", file_color="green"),
    ),
    dict(
        id="target-unhealthy-refused",
        env=dict(green_healthy=False),
        target="green",
        failed=True,
        changed=False,
        msg="refusing to switch to green: its direct health check failed",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="target-unhealthy-refused-check-mode",
        env=dict(green_healthy=False),
        target="green",
        check_mode=True,
        failed=True,
        msg="answered 503",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="target-down-per-haproxy",
        env=dict(haproxy_green_port="closed"),
        target="green",
        prepare=_wait_green_down,
        failed=True,
        changed=False,
        msg="HAProxy reports server be_green/green as 'DOWN",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="target-maint-per-haproxy",
        target="green",
        prepare=_disable_green,
        failed=True,
        changed=False,
        msg="as 'MAINT'",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="check-mode-would-change",
        target="green",
        prepare=_wait_up,
        check_mode=True,
        failed=False,
        changed=True,
        runtime="blue",
        file="blue",
        result=dict(previous_color="blue", switched_at=None),
    ),
    dict(
        id="check-mode-already-live",
        target="blue",
        prepare=_wait_up,
        check_mode=True,
        failed=False,
        changed=False,
        runtime="blue",
        file="blue",
    ),
    dict(
        id="diff",
        target="green",
        prepare=_wait_up,
        show_diff=True,
        failed=False,
        changed=True,
        runtime="green",
        file="green",
        diff={"before": "# live color\nlive blue\n", "after": "# live color\nlive green\n"},
    ),
    dict(
        id="diff-check-mode",
        target="green",
        prepare=_wait_up,
        show_diff=True,
        check_mode=True,
        failed=False,
        changed=True,
        runtime="blue",
        file="blue",
        diff={"before": "# live color\nlive blue\n", "after": "# live color\nlive green\n"},
    ),
    dict(
        id="missing-socket",
        target="green",
        extra=dict(admin_socket="/tmp/bgs-no-such-dir/admin.sock"),
        failed=True,
        msg="HAProxy admin socket /tmp/bgs-no-such-dir/admin.sock does not exist",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="wrong-map-file",
        target="green",
        extra=dict(map_file="/etc/haproxy/other.map"),
        failed=True,
        msg="HAProxy has no map loaded from /etc/haproxy/other.map",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="unknown-color-in-colors",
        target="green",
        extra=dict(colors={"green": {"port": 1}, "red": {"port": 2}}),
        failed=True,
        msg="colors: unknown color 'red'",
        runtime="blue",
        file="blue",
    ),
    dict(
        id="confirmation-fails-flips-back",
        target="green",
        prepare=_wait_up,
        liar="blue",
        extra=dict(confirm_timeout=0.5),
        failed=True,
        changed=False,
        msg="switch to green not confirmed: 0 of 3",
        runtime="blue",
        file="blue",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_switch(case, make_env, capsys):
    env_kwargs = dict(case.get("env", {}))
    closed = None
    if env_kwargs.get("haproxy_green_port") == "closed":
        closed = free_port()
        env_kwargs["haproxy_green_port"] = closed
    env = make_env(**env_kwargs)
    if case.get("prepare"):
        case["prepare"](env)
    extra = dict(case.get("extra", {}))
    liar = None
    if case.get("liar"):
        liar = LiarServer(case["liar"]).start()
        extra["frontend_url"] = f"http://127.0.0.1:{liar.port}"
    try:
        result = run_module(
            blue_green_switch.main,
            env.args(case["target"], **extra),
            capsys,
            check_mode=case.get("check_mode", False),
            diff=case.get("show_diff", False),
        )
    finally:
        if liar:
            liar.stop()

    assert bool(result.get("failed")) is case["failed"], result
    if "changed" in case:
        assert result["changed"] is case["changed"], result
    if "msg" in case:
        assert case["msg"] in result["msg"], result["msg"]
    if "warning" in case:
        assert any(case["warning"] in w for w in warnings(result)), warnings(result)
    for key, value in case.get("result", {}).items():
        assert result[key] == value, (key, result)
    if "diff" in case:
        assert result["diff"]["before"] == case["diff"]["before"]
        assert result["diff"]["after"] == case["diff"]["after"]
        assert result["diff"]["before_header"] == env.map_file
    if (
        not case["failed"]
        and case["changed"]
        and not case.get("check_mode")
        and case["runtime"] != result["previous_color"]
    ):
        assert result["switched_at"].endswith("Z")
    # The state of the world afterwards: the running HAProxy and the file.
    assert env.runtime_color() == case["runtime"]
    assert env.file_text().strip().splitlines()[-1] == "live {}".format(case["file"])
    # New requests through the frontend go to the runtime color.
    assert env.frontend_get("/") == (200, case["runtime"])
    # No temp file is left next to the map.
    assert sorted(os.listdir(env.dir)) == sorted(
        n for n in ["admin.sock", "haproxy.cfg", "live.map", "lock"] if os.path.exists(os.path.join(env.dir, n))
    )


def test_switch_persists_across_restart(make_env, capsys):
    env = make_env()
    _wait_up(env)
    inode_before = os.stat(env.map_file).st_ino
    result = run_module(blue_green_switch.main, env.args("green"), capsys)
    assert result["changed"] and not result.get("failed")
    # Written by rename: a new inode, never a torn file.
    assert os.stat(env.map_file).st_ino != inode_before
    env.haproxy.restart()
    assert env.runtime_color() == "green"
    _wait_up(env)
    assert env.frontend_get("/")[1] == "green"
    again = run_module(blue_green_switch.main, env.args("green"), capsys)
    assert again["changed"] is False


def test_drain_waits_for_in_flight_request(make_env, capsys):
    env = make_env()
    _wait_up(env)
    env.blue.slow_release.clear()
    env.blue.slow_extra = 1.0
    outcome = {}

    def slow_client():
        outcome["answer"] = env.frontend_get("/slow")

    client = threading.Thread(target=slow_client)
    client.start()
    assert env.blue.slow_started.wait(10)
    # The slow request on blue is let go once HAProxy routes to green; it then takes 1 s more, so it is still
    # in flight on blue while the module confirms and drains.
    stop = threading.Event()

    def release_when_flipped():
        while not stop.is_set():
            if env.runtime_color() == "green":
                env.blue.slow_release.set()
                return
            stop.wait(0.02)

    releaser = threading.Thread(target=release_when_flipped)
    releaser.start()
    try:
        result = run_module(blue_green_switch.main, env.args("green", drain_timeout=20), capsys)
        # The module returned only after blue had answered the slow request (ordering, not timing).
        answered_before_return = env.blue.slow_done.is_set()
    finally:
        stop.set()
        env.blue.slow_release.set()
        releaser.join(5)
        client.join(10)
    assert answered_before_return, "module returned before blue drained"
    assert outcome["answer"] == (200, "blue")
    assert result["changed"] is True and result["drained"] is True
    assert result["drain_seconds"] > 0
    assert env.frontend_get("/")[1] == "green"


def test_drain_timeout_warns_not_fails(make_env, capsys):
    env = make_env()
    _wait_up(env)
    env.blue.slow_release.clear()
    client = threading.Thread(target=env.frontend_get, args=("/slow",))
    client.start()
    assert env.blue.slow_started.wait(10)
    try:
        result = run_module(blue_green_switch.main, env.args("green", drain_timeout=0.3), capsys)
    finally:
        env.blue.slow_release.set()
        client.join(10)
    assert not result.get("failed") and result["changed"] is True
    assert result["drained"] is False
    assert any("still had 1 session" in w for w in warnings(result)), warnings(result)
    assert env.runtime_color() == "green"


def test_keep_alive_client_follows_switch(make_env, capsys):
    env = make_env()
    _wait_up(env)
    conn = http.client.HTTPConnection("127.0.0.1", env.frontend_port, timeout=10)
    try:
        conn.request("GET", "/one")
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("X-Sovereign-Color") == "blue"
        sock = conn.sock
        assert sock is not None  # the connection is kept alive
        result = run_module(blue_green_switch.main, env.args("green"), capsys)
        assert result["changed"] is True
        conn.request("GET", "/two")
        resp = conn.getresponse()
        resp.read()
        assert conn.sock is sock, "the client had to reconnect"
        assert resp.getheader("X-Sovereign-Color") == "green"
    finally:
        conn.close()
    assert ("GET", "/two") in env.green.requests and ("GET", "/two") not in env.blue.requests


_HOLDER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from ansible_collections.sovereign.mlops.plugins.module_utils._switch_lock import SwitchLock
with SwitchLock(sys.argv[1], timeout=5, purpose='test holder'):
    print('locked', flush=True)
    sys.stdin.read()
"""


def test_lock_held_by_other_process(make_env, capsys):
    env = make_env()
    _wait_up(env)
    os.makedirs(os.path.dirname(env.lock_path), exist_ok=True)
    # The directory that holds ansible_collections/ (this module's file is .../ansible_collections/sovereign/
    # mlops/plugins/modules/blue_green_switch.py).
    collections_root = str(pathlib.Path(blue_green_switch.__file__).parents[5])
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, env.lock_path, collections_root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_module(blue_green_switch.main, env.args("green", lock_timeout=0.5), capsys)
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    assert result["failed"] is True
    assert f"could not take the lock {env.lock_path} within 0.5s" in result["msg"]
    assert f"pid {holder.pid}" in result["msg"] and "test holder" in result["msg"]
    assert env.runtime_color() == "blue"
    # Once the holder is gone the switch goes through.
    result = run_module(blue_green_switch.main, env.args("green", lock_timeout=0.5), capsys)
    assert result["changed"] is True


def test_haproxy_not_running(make_env, capsys):
    env = make_env()
    env.haproxy.stop()
    open(env.admin_socket, "w").close()  # a leftover file, nobody listening
    try:
        result = run_module(blue_green_switch.main, env.args("green"), capsys)
    finally:
        os.unlink(env.admin_socket)
    assert result["failed"] is True
    assert env.admin_socket in result["msg"]
    assert "HAProxy is not running" in result["msg"] or "nobody" in result["msg"]


def test_hitless_reload_keeps_switched_color(make_env, capsys):
    """A reload (topology change) re-reads the map file: the color the module persisted stays live."""
    env = make_env(master_worker=True)
    _wait_up(env)
    assert run_module(blue_green_switch.main, env.args("green"), capsys)["changed"] is True
    env.haproxy.reload()
    assert env.runtime_color() == "green"
    _wait_up(env)
    assert env.frontend_get("/")[1] == "green"


class LoadClient(threading.Thread):
    """Keep-alive GETs through the frontend until stopped; counts answers per color and failures."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.colors = {}
        self.failures = []

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/v2/models/m/ready")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                continue
            if resp.status != 200:
                self.failures.append(resp.status)
            color = resp.getheader("X-Sovereign-Color")
            self.colors[color] = self.colors.get(color, 0) + 1
        conn.close()


def test_no_failed_request_while_switching_under_load(make_env, capsys):
    env = make_env()
    _wait_up(env)
    clients = [LoadClient(env.frontend_port) for _client in range(3)]
    for client in clients:
        client.start()
    try:
        for color in ("green", "blue", "green", "blue"):
            result = run_module(blue_green_switch.main, env.args(color, confirm_requests=2), capsys)
            assert result["changed"] is True and result["drained"] is True, result
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(10)
    assert [c.failures for c in clients] == [[], [], []]
    assert all(set(c.colors) <= {"blue", "green"} for c in clients)
    assert sum(c.colors.get("green", 0) for c in clients) > 0


def test_no_failed_request_across_reloads_under_load(make_env, capsys):
    """Reloads are for topology changes; keep-alive clients must not see errors across them either."""
    env = make_env(master_worker=True)
    _wait_up(env)
    clients = [LoadClient(env.frontend_port) for _client in range(3)]
    for client in clients:
        client.start()
    try:
        assert run_module(blue_green_switch.main, env.args("green", confirm_requests=2), capsys)["changed"] is True
        for _reload in range(3):
            env.haproxy.reload()
            env.haproxy.wait_status("green", "UP")
            # Let every client send on its (possibly old-worker) connection before the next reload.
            counts = [sum(c.colors.values()) for c in clients]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                sum(c.colors.values()) < n + 5 for c, n in zip(clients, counts, strict=True)
            ):
                time.sleep(0.01)
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(10)
    assert [c.failures for c in clients] == [[], [], []]
    assert env.runtime_color() == "green"


def test_switch_with_only_the_host_contract(make_env, capsys):
    """color + contract: the admin socket, map file, the colors' ports and the frontend URL all come from the host
    contract (here on high ports and temp paths, so a built-in default would not reach this HAProxy)."""
    env = make_env()
    _wait_up(env)
    contract = dict(
        version=1,
        runtime=dict(colors=dict(blue=dict(host="127.0.0.1", port=env.blue.port), green=dict(port=env.green.port))),
        traffic_switch=dict(
            admin_socket=env.admin_socket,
            map_file=env.map_file,
            map_key="live",
            health_path="/v2/health/ready",
            frontend=dict(address="127.0.0.1", port=env.frontend_port, url=f"http://127.0.0.1:{env.frontend_port}"),
        ),
    )
    args = dict(color="green", contract=contract, lock_path=env.lock_path, drain_timeout=10, confirm_timeout=3)
    result = run_module(blue_green_switch.main, args, capsys)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert result["confirmed_requests"] == 3
    assert env.runtime_color() == "green"
    assert "live green" in env.file_text()
    again = run_module(blue_green_switch.main, args, capsys)
    assert again["changed"] is False
