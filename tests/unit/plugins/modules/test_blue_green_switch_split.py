# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""blue_green_switch's weighted, sticky split (docs/adr/1401) against a real haproxy running the role's template.

The Python twin of the frontend's routing (``_haproxy.sticky_bucket``/``arm_of``) is checked against what the real
HAProxy does with the same keys: if they disagree, the canary analysis would probe the wrong arm.
"""

from __future__ import annotations

import collections
import http.client

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils._haproxy import arm_of, shares, sticky_bucket
from ansible_collections.sovereign.mlops.plugins.modules import blue_green_switch
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    needs_haproxy,
    run_module,
)
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.test_blue_green_switch import Env, _wait_up

KEYS = [f"user-{n}" for n in range(200)]


@pytest.fixture
def make_env():
    """Env (test_blue_green_switch): haproxy from the role's template and blue/green backends, closed after."""
    envs = []

    def make(**kwargs):
        env = Env(**kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _entries(text):
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _runtime(env):
    out = {}
    for line in env.haproxy.command(f"show map {env.map_file}").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[parts[1]] = parts[2]
    return out


def _colors(env, keys=None, n=0, header="X-Sovereign-Key", cookie=False):
    """Colors that answered, one keep-alive connection: one request per key, or ``n`` requests without a key."""
    conn = http.client.HTTPConnection("127.0.0.1", env.frontend_port, timeout=10)
    out = []
    try:
        for key in keys if keys is not None else [None] * n:
            headers = {}
            if key is not None:
                headers = {"Cookie": f"other=1; sovereign_key={key}"} if cookie else {header: key}
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            out.append(resp.getheader("X-Sovereign-Color"))
    finally:
        conn.close()
    return out


# Pure planning of the runtime commands: every intermediate state may only route to a color that gets traffic before
# or after. (live, canary, weight) before, the target, the commands.
PLAN_CASES = [
    ("first-split", ("blue", None, None), ("blue", "green", "5"), [("canary", "green"), ("weight", "5")]),
    ("step-up", ("blue", "green", "5"), ("blue", "green", "25"), [("weight", "25")]),
    ("abort", ("blue", "green", "25"), ("blue", "green", "0"), [("weight", "0")]),
    ("promote-canary", ("blue", "green", "100"), ("green", "green", "0"), [("live", "green"), ("weight", "0")]),
    ("switch-away-from-split", ("blue", "green", "30"), ("green", "green", "0"), [("live", "green"), ("weight", "0")]),
    # A stale canary entry that names the live color: the weight goes to 0 before the canary moves.
    (
        "stale-canary-entry",
        ("green", "green", "30"),
        ("green", "blue", "10"),
        [("weight", "0"), ("canary", "blue"), ("weight", "10")],
    ),
    ("nothing-to-do", ("blue", "green", "0"), ("blue", "green", "0"), []),
    ("plain-switch-no-split", ("blue", None, None), ("green", None, None), [("live", "green")]),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_steps(case):
    _id, before, after, expected = case
    keys = ("live", "canary", "weight")
    runtime, target = dict(zip(keys, before, strict=True)), dict(zip(keys, after, strict=True))
    steps = blue_green_switch.plan_steps(runtime, target, keys)
    assert steps == expected
    # The invariant, state by state.
    state = dict(runtime)
    allowed = {c for c, v in shares(*before).items() if v} | {c for c, v in shares(*after).items() if v}
    for key, value in steps:
        state[key] = value
        now = {c for c, v in shares(state["live"], state["canary"], state["weight"]).items() if v}
        assert now <= allowed, (key, value, state)


SHARE_CASES = [
    (("blue", "green", "25"), {"blue": 75, "green": 25}),
    (("blue", "green", "0"), {"blue": 100, "green": 0}),
    (("blue", "green", "100"), {"blue": 0, "green": 100}),
    (("blue", "blue", "40"), {"blue": 100, "green": 0}),
    (("green", "blue", "not-a-number"), {"blue": 0, "green": 100}),
    (("green", "blue", "250"), {"blue": 100, "green": 0}),
    (("blue", None, None), {"blue": 100, "green": 0}),
]


@pytest.mark.parametrize("case", SHARE_CASES, ids=[str(c[0]) for c in SHARE_CASES])
def test_shares(case):
    assert shares(*case[0]) == case[1]


@needs_haproxy
def test_split_routes_by_key_and_weight_and_persists(make_env, capsys):
    env = make_env()
    _wait_up(env)
    result = run_module(blue_green_switch.main, env.args("green", weight=25), capsys, diff=True)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert result["weights"] == {"blue": 75, "green": 25} and result["previous_weights"] == {"blue": 100, "green": 0}
    assert (result["live_color"], result["canary_color"], result["weight"]) == ("blue", "green", 25)
    # Confirmed with one key per arm (3 requests each).
    assert result["confirmed_requests"] == 6
    assert result["diff"]["after"] == "# live color\nlive blue\ncanary green\nweight 25\n"
    assert _entries(env.file_text()) == {"live": "blue", "canary": "green", "weight": "25"}
    assert _runtime(env) == {"live": "blue", "canary": "green", "weight": "25"}

    # Sticky: HAProxy puts each key where the Python twin says, the same on every request; header or cookie.
    expected = [arm_of(k, "blue", "green", 25) for k in KEYS]
    assert _colors(env, KEYS) == expected
    assert _colors(env, KEYS) == expected
    assert _colors(env, KEYS, cookie=True) == expected
    assert 0.15 < expected.count("green") / len(KEYS) < 0.35
    # Without a key: by weight, per request (keep-alive connection), within a binomial tolerance (n=600, p=.25).
    seen = collections.Counter(_colors(env, n=600))
    assert 0.25 - 0.06 < seen["green"] / 600 < 0.25 + 0.06, seen

    # Idempotent; the same split said from the live color's side is the same state.
    again = run_module(blue_green_switch.main, env.args("green", weight=25), capsys)
    assert again["changed"] is False and not again.get("failed")
    same = run_module(blue_green_switch.main, env.args("blue", weight=75), capsys)
    assert same["changed"] is False and same["weights"] == {"blue": 75, "green": 25}

    # A restart keeps the split (the map file is loaded at start).
    env.haproxy.restart()
    _wait_up(env)
    assert _colors(env, KEYS) == expected

    # Stepping up moves keys only from blue to green.
    run_module(blue_green_switch.main, env.args("green", weight=50), capsys)
    at_50 = _colors(env, KEYS)
    assert all(b == "green" for a, b in zip(expected, at_50, strict=True) if a == "green")
    assert at_50 == [arm_of(k, "blue", "green", 50) for k in KEYS]

    # Abort: the classic switch to the live color puts everything there, weight 0, the canary drained.
    abort = run_module(blue_green_switch.main, env.args("blue", drain_timeout=0), capsys)
    assert abort["changed"] is True and abort["weights"] == {"blue": 100, "green": 0}
    assert _runtime(env)["weight"] == "0" and _entries(env.file_text())["weight"] == "0"
    assert set(_colors(env, KEYS[:50])) == {"blue"}


@needs_haproxy
def test_split_promote_to_100_then_switch(make_env, capsys):
    env = make_env()
    _wait_up(env)
    run_module(blue_green_switch.main, env.args("green", weight=100), capsys)
    assert set(_colors(env, KEYS[:30])) == {"green"} and set(_colors(env, n=30)) == {"green"}
    promote = run_module(blue_green_switch.main, env.args("green"), capsys)
    assert promote["changed"] is True and not promote.get("failed"), promote
    assert (promote["live_color"], promote["weight"], promote["weights"]) == ("green", 0, {"blue": 0, "green": 100})
    assert _runtime(env) == {"live": "green", "canary": "green", "weight": "0"}
    assert set(_colors(env, KEYS[:30])) == {"green"}


@needs_haproxy
def test_split_check_mode_changes_nothing(make_env, capsys):
    env = make_env()
    _wait_up(env)
    before = env.file_text()
    result = run_module(blue_green_switch.main, env.args("green", weight=5), capsys, check_mode=True, diff=True)
    assert result["changed"] is True and result["weights"] == {"blue": 95, "green": 5}
    assert result["diff"]["after"].endswith("canary green\nweight 5\n")
    assert env.file_text() == before and _runtime(env) == {"live": "blue"}


@needs_haproxy
@pytest.mark.parametrize("weight", [-1, 101, 250])
def test_split_weight_out_of_range_changes_nothing(make_env, capsys, weight):
    env = make_env()
    before = env.file_text()
    result = run_module(blue_green_switch.main, env.args("green", weight=weight), capsys)
    assert result["failed"] is True
    assert f"weight must be a percentage between 0 and 100, got {weight}" in result["msg"]
    assert env.file_text() == before and _runtime(env) == {"live": "blue"}


@needs_haproxy
def test_split_refuses_unhealthy_canary(make_env, capsys):
    env = make_env(green_healthy=False)
    env.haproxy.wait_status("blue", "UP")
    result = run_module(blue_green_switch.main, env.args("green", weight=5), capsys)
    assert result["failed"] is True and "refusing to send more traffic to green" in result["msg"], result["msg"]
    assert _runtime(env) == {"live": "blue"} and "weight" not in env.file_text()


@needs_haproxy
def test_split_canary_down_falls_back_to_live(make_env, capsys):
    """A canary whose server HAProxy marks down loses no request: the live color answers its keys."""
    env = make_env()
    _wait_up(env)
    run_module(blue_green_switch.main, env.args("green", weight=50), capsys)
    env.green.stop()
    env.haproxy.wait_status("green", "DOWN")
    assert set(_colors(env, KEYS[:40])) == {"blue"}


def test_sticky_bucket_is_crc32_mod_100():
    # zlib.crc32 (HAProxy's crc32 converter without avalanche): fixed values, so a change of hash is a visible change.
    # Not Python's hash(): the same in every process.
    assert [sticky_bucket(k) for k in ("", "a", "user-1", "user-2")] == [0, 7, 24, 50]
    assert sticky_bucket(b"user-1") == 24
    assert all(0 <= sticky_bucket(k) < 100 for k in KEYS)
