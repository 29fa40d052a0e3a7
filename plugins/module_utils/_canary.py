# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The canary analysis's judge: canary against stable, pass / fail / inconclusive (docs/adr/1402).

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

Pure functions (no I/O), so the rules are tested by table (tests/unit/plugins/module_utils/test_canary.py):

* :func:`arm_figures`: one arm's requests, errors, error ratio, p50 and p99 from probe observations;
* :func:`judge`: the verdict and every check with its measurement and limit;
* :func:`render_query`: a user's PromQL with ``$color``, ``$stable``, ``$host``, ``$window`` filled in.

The rules, in order:

1. **Errors that no sample can dilute fail at once**: when the canary has more errors than
   ``max_error_ratio * max(requests, min_requests)`` allows, it fails whatever its sample size (a canary answering
   5 errors out of its first 6 requests does not need 14 more to be judged).
2. Fewer than ``min_requests`` requests on either arm: **inconclusive** (hold longer; no data is not a pass).
3. ``error_ratio``: the canary's error ratio (non-200 answers, transport errors, answers from the other color)
   at most ``max_error_ratio``.
4. ``p99``: the canary's p99 at most ``max_p99_ms``.
5. ``p99_vs_stable``: the canary's p99 at most ``max(stable p99 * max_p99_ratio, stable p99 + p99_tolerance_ms)``
   (the tolerance keeps a 2 ms vs 4 ms difference on a quiet system from failing a deploy); off when
   ``max_p99_ratio`` is 0.
6. each user query: its value for the canary within ``min``/``max``; no value is inconclusive.

A failed check fails the step; otherwise any inconclusive check makes it inconclusive; else it passes.
"""

from __future__ import annotations

import math
import string

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


def percentile(values, pct):
    """Nearest-rank percentile (the smoke test's and the watch's definition); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100.0 * len(ordered))) - 1]


def arm_figures(latencies_ms, errors, wrong_color=0):
    """``{requests, errors, wrong_color, error_ratio, p50_ms, p99_ms}`` of one arm: ``latencies_ms`` of its
    successful requests, ``errors`` (wrong-color answers included) of the others."""
    requests = len(latencies_ms) + errors
    p50, p99 = percentile(latencies_ms, 50), percentile(latencies_ms, 99)
    return dict(
        requests=requests,
        errors=errors,
        wrong_color=wrong_color,
        error_ratio=round(errors / requests, 6) if requests else None,
        p50_ms=round(p50, 3) if p50 is not None else None,
        p99_ms=round(p99, 3) if p99 is not None else None,
    )


def _check(name, value, limit, ok, detail):
    return dict(name=name, value=value, limit=limit, ok=ok, detail=detail)


def judge(canary, stable, limits, query_values=None):
    """(verdict, checks). ``canary``/``stable``: :func:`arm_figures`-shaped dicts (``requests``, ``errors``,
    ``error_ratio``, ``p99_ms``); ``limits``: ``min_requests``, ``max_error_ratio``, ``max_p99_ms``,
    ``max_p99_ratio``, ``p99_tolerance_ms``; ``query_values``: ``[{name, value, min, max}]``.

    Each check: ``{name, value, limit, ok, detail}`` with ``ok`` True, False or None (not measurable yet)."""
    checks = []
    min_requests = limits["min_requests"]
    max_ratio = limits["max_error_ratio"]
    c_requests, c_errors = canary.get("requests") or 0, canary.get("errors") or 0
    s_requests = stable.get("requests") or 0

    budget = max_ratio * max(c_requests, min_requests)
    if c_errors > budget and c_requests < min_requests:
        checks.append(
            _check(
                "error_ratio",
                round(c_errors / c_requests, 6) if c_requests else None,
                max_ratio,
                False,
                f"canary error ratio: {c_errors} errors in its first {c_requests} requests, more than "
                f"{max_ratio:g} of even {min_requests} requests allows",
            )
        )
        return FAIL, checks

    enough = c_requests >= min_requests and s_requests >= min_requests
    checks.append(
        _check(
            "requests",
            dict(canary=c_requests, stable=s_requests),
            min_requests,
            True if enough else None,
            f"requests: canary {c_requests:g}, stable {s_requests:g} (each needs {min_requests})",
        )
    )
    if not enough:
        return INCONCLUSIVE, checks

    ratio = canary.get("error_ratio")
    if ratio is None:
        ratio = c_errors / c_requests
    checks.append(
        _check(
            "error_ratio",
            round(ratio, 6),
            max_ratio,
            ratio <= max_ratio,
            f"canary error ratio {ratio:.4f} ({c_errors:g}/{c_requests:g}) vs limit {max_ratio:g} "
            f"(stable {stable.get('error_ratio') if stable.get('error_ratio') is not None else 'n/a'})",
        )
    )

    c_p99, s_p99 = canary.get("p99_ms"), stable.get("p99_ms")
    if c_p99 is None:
        checks.append(_check("p99", None, limits["max_p99_ms"], None, "canary p99: no successful request"))
    else:
        checks.append(
            _check(
                "p99",
                c_p99,
                limits["max_p99_ms"],
                c_p99 <= limits["max_p99_ms"],
                f"canary p99 {c_p99:.1f} ms vs limit {limits['max_p99_ms']:g} ms",
            )
        )
        if limits.get("max_p99_ratio") and s_p99 is not None:
            bound = max(s_p99 * limits["max_p99_ratio"], s_p99 + limits.get("p99_tolerance_ms", 0.0))
            checks.append(
                _check(
                    "p99_vs_stable",
                    c_p99,
                    round(bound, 3),
                    c_p99 <= bound,
                    f"canary p99 {c_p99:.1f} ms vs stable p99 {s_p99:.1f} ms (limit {bound:.1f} ms: x"
                    f"{limits['max_p99_ratio']:g} or +{limits.get('p99_tolerance_ms', 0.0):g} ms)",
                )
            )

    for item in query_values or []:
        value, low, high = item.get("value"), item.get("min"), item.get("max")
        limit = dict(min=low, max=high)
        if value is None:
            checks.append(
                _check(item["name"], None, limit, None, f"{item['name']}: no value ({item.get('error', '')})")
            )
            continue
        ok = (low is None or value >= low) and (high is None or value <= high)
        bounds = " and ".join(
            part
            for part in ((f">= {low:g}" if low is not None else ""), (f"<= {high:g}" if high is not None else ""))
            if part
        )
        checks.append(_check(item["name"], value, limit, ok, f"{item['name']} = {value:g} (must be {bounds})"))

    if any(c["ok"] is False for c in checks):
        return FAIL, checks
    if any(c["ok"] is None for c in checks):
        return INCONCLUSIVE, checks
    return PASS, checks


def failed_checks(checks):
    """The details of the checks that failed (False), for the failure message and the ledger."""
    return [c["detail"] for c in checks if c["ok"] is False]


def render_query(query, canary, stable, host, window_s):
    """A user's PromQL with ``$color`` (the canary), ``$stable``, ``$host`` and ``$window`` (e.g. ``30s``) filled in;
    ``$$`` is a literal ``$``. Unknown ``$names`` raise ValueError naming them."""
    values = dict(color=canary, stable=stable, host=host, window=f"{max(1, math.ceil(window_s))}s")
    try:
        return string.Template(query).substitute(values)
    except KeyError as exc:
        raise ValueError(
            f"unknown placeholder ${exc.args[0]} in canary query {query!r} (known: $color, $stable, $host, $window)"
        ) from None
    except ValueError as exc:
        raise ValueError(f"bad placeholder in canary query {query!r}: {exc}") from None
