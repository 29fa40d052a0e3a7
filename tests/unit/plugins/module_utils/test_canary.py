# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The canary judge (module_utils/_canary.py, docs/adr/1402) by table: pure functions, no I/O."""

from __future__ import annotations

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils._canary import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    arm_figures,
    failed_checks,
    judge,
    render_query,
)

LIMITS = dict(min_requests=20, max_error_ratio=0.01, max_p99_ms=100.0, max_p99_ratio=1.5, p99_tolerance_ms=10.0)


def arm(requests, errors=0, p99=5.0):
    return dict(requests=requests, errors=errors, error_ratio=errors / requests if requests else None, p99_ms=p99)


# id, canary, stable, limits overrides, queries, verdict, names of failed checks, names of unmeasured checks
CASES = [
    ("healthy", arm(100), arm(100), {}, None, PASS, [], []),
    ("too-few-canary", arm(10), arm(100), {}, None, INCONCLUSIVE, [], ["requests"]),
    ("too-few-stable", arm(100), arm(5), {}, None, INCONCLUSIVE, [], ["requests"]),
    ("no-data-at-all", dict(requests=None, errors=None), dict(requests=None), {}, None, INCONCLUSIVE, [], ["requests"]),
    # 5 errors in 6 requests: more than 1 % of even 20 requests allows - failed without waiting for 20.
    ("errors-no-sample-dilutes", arm(6, errors=5), arm(6), {}, None, FAIL, ["error_ratio"], []),
    # 0.2 errors allowed in 20: one error in 6 requests already fails.
    ("one-error-early", arm(6, errors=1), arm(6), {}, None, FAIL, ["error_ratio"], []),
    ("one-error-early-lenient", arm(6, errors=1), arm(6), dict(max_error_ratio=0.1), None, INCONCLUSIVE, [], []),
    ("error-ratio-over", arm(200, errors=4), arm(200), {}, None, FAIL, ["error_ratio"], []),
    ("error-ratio-at-limit", arm(200, errors=2), arm(200), {}, None, PASS, [], []),
    ("p99-over-limit", arm(100, p99=152.0), arm(100, p99=140.0), {}, None, FAIL, ["p99"], []),
    ("p99-vs-stable", arm(100, p99=60.0), arm(100, p99=20.0), {}, None, FAIL, ["p99_vs_stable"], []),
    # 2 ms vs 4 ms: x2, but within the 10 ms tolerance.
    ("p99-small-absolute-difference", arm(100, p99=4.0), arm(100, p99=2.0), {}, None, PASS, [], []),
    ("p99-ratio-off", arm(100, p99=60.0), arm(100, p99=20.0), dict(max_p99_ratio=0), None, PASS, [], []),
    ("no-successful-request", dict(requests=30, errors=0, p99_ms=None), arm(30), {}, None, INCONCLUSIVE, [], ["p99"]),
    (
        "query-in-bounds",
        arm(100),
        arm(100),
        {},
        [dict(name="fraud_rate", value=0.02, max=0.05)],
        PASS,
        [],
        [],
    ),
    ("query-over", arm(100), arm(100), {}, [dict(name="fraud_rate", value=0.2, max=0.05)], FAIL, ["fraud_rate"], []),
    ("query-under", arm(100), arm(100), {}, [dict(name="ctr", value=0.01, min=0.03)], FAIL, ["ctr"], []),
    (
        "query-no-value",
        arm(100),
        arm(100),
        {},
        [dict(name="ctr", value=None, min=0.03, error="empty result")],
        INCONCLUSIVE,
        [],
        ["ctr"],
    ),
    # A failure wins over an unmeasurable query.
    (
        "fail-beats-inconclusive",
        arm(100, errors=50),
        arm(100),
        {},
        [dict(name="ctr", value=None, min=0.03)],
        FAIL,
        ["error_ratio"],
        ["ctr"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_judge(case):
    _id, canary, stable, overrides, queries, verdict, failed, unmeasured = case
    got, checks = judge(canary, stable, dict(LIMITS, **overrides), queries)
    assert got == verdict, checks
    assert [c["name"] for c in checks if c["ok"] is False] == failed
    for name in unmeasured:
        assert any(c["name"] == name and c["ok"] is None for c in checks), checks
    # Every failed check's detail names its measurement and its limit.
    for detail in failed_checks(checks):
        assert any(ch.isdigit() for ch in detail), detail


def test_failed_details_name_the_measurements():
    _verdict, checks = judge(arm(100, errors=4, p99=152.0), arm(100, p99=3.0), LIMITS)
    details = failed_checks(checks)
    assert "canary error ratio 0.0400 (4/100) vs limit 0.01" in details[0]
    assert "canary p99 152.0 ms vs limit 100 ms" in details[1]
    assert "stable p99 3.0 ms" in details[2]


def test_arm_figures():
    figures = arm_figures([1.0, 2.0, 3.0, 100.0], errors=1, wrong_color=1)
    assert figures == dict(requests=5, errors=1, wrong_color=1, error_ratio=0.2, p50_ms=2.0, p99_ms=100.0)
    assert arm_figures([], 0)["error_ratio"] is None and arm_figures([], 0)["p99_ms"] is None


QUERY_CASES = [
    ('rate(x_total{color="$color"}[$window])', 'rate(x_total{color="green"}[31s])'),
    ('a{color="$stable",host="$host"}', 'a{color="blue",host="inf-01"}'),
    ("cost_$$", "cost_$"),
]


@pytest.mark.parametrize(("query", "expected"), QUERY_CASES)
def test_render_query(query, expected):
    assert render_query(query, "green", "blue", "inf-01", 30.2) == expected


def test_render_query_unknown_placeholder():
    with pytest.raises(ValueError, match=r"unknown placeholder \$colour"):
        render_query("x{color='$colour'}", "green", "blue", "inf-01", 30)
