# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Prometheus's HTTP API, and the PromQL the release flow asks it: one home for both.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

* :func:`query`: an instant query (``GET /api/v1/query``), the result as ``[(labels, value)]``; every failure
  (unreachable, HTTP error, an error status, a result that is not a vector) raises :class:`PrometheusError` with a
  message that names the URL and the cause.
* :func:`color_window`: a runtime color's requests, 5xx ratio and p99 over the last seconds, from the runtime's own
  metrics (``sovereign_runtime_requests_total``, ``sovereign_runtime_request_duration_seconds``, labels ``host`` and
  ``color`` as the prometheus role's file_sd sets them). The same expressions as the alerts
  InferenceErrorRatioHigh and InferenceLatencyP99High (roles/inference_runtime/files/monitoring/alerts.yml), over
  the watch window instead of 5 minutes.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse

from ansible.module_utils.urls import open_url

RUNTIME_JOB = "sovereign_runtime"


class PrometheusError(Exception):
    """Prometheus could not answer a query (the message says why)."""


def selector(regex=None, **labels):
    """A PromQL label matcher ``{a="x",b="y"}`` (values escaped, sorted); ``regex`` adds ``{name: re}`` as ``=~``."""
    items = [f"{k}={json.dumps(str(v))}" for k, v in labels.items() if v is not None]
    items += [f"{k}=~{json.dumps(str(v))}" for k, v in (regex or {}).items()]
    return "{" + ",".join(sorted(items)) + "}"


def query(base_url, promql, at=None, timeout=5.0, opener=open_url):
    """Run an instant query; ``[(labels, float value)]`` of the vector (or scalar) result."""
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params)
    try:
        with opener(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = _error_of(exc.read())
        raise PrometheusError(f"{base_url} answered HTTP {exc.code} to {promql!r}{detail}") from None
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrometheusError(f"cannot reach Prometheus at {base_url}: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise PrometheusError(f"{base_url} did not answer JSON to {promql!r}: {body[:200]!r}") from None
    if doc.get("status") != "success":
        raise PrometheusError(f"{base_url} refused {promql!r}: {doc.get('errorType')}: {doc.get('error')}")
    data = doc.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return [({}, float(result[1]))]
    if kind != "vector":
        raise PrometheusError(f"{base_url} answered a {kind} to {promql!r}, not a vector")
    return [(item.get("metric") or {}, float(item["value"][1])) for item in result]


def _error_of(body):
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return f": {doc.get('errorType')}: {doc.get('error')}" if isinstance(doc, dict) else ""


def scalar(base_url, promql, **kwargs):
    """The single value of a query, None when the result is empty or NaN (no data)."""
    result = query(base_url, promql, **kwargs)
    if not result:
        return None
    if len(result) > 1:
        raise PrometheusError(f"{promql!r} returned {len(result)} series, expected one: {[r[0] for r in result]}")
    value = result[0][1]
    return None if math.isnan(value) else value


def window_queries(host, color, seconds, job=RUNTIME_JOB):
    """The three PromQL expressions of :func:`color_window`: infer requests, 5xx among them, p99 in seconds."""
    window = f"[{max(1, math.ceil(seconds))}s]"
    infer = selector(job=job, host=host, color=color, endpoint="infer")
    errors = selector(job=job, host=host, color=color, endpoint="infer", regex={"code": "5.."})
    buckets = selector(job=job, host=host, color=color)
    requests = f"sum(increase(sovereign_runtime_requests_total{infer}{window}))"
    return {
        "requests": requests,
        "errors": f"sum(increase(sovereign_runtime_requests_total{errors}{window})) or vector(0)",
        "p99": (
            f"histogram_quantile(0.99, sum by (le) "
            f"(increase(sovereign_runtime_request_duration_seconds_bucket{buckets}{window})))"
        ),
    }


def color_window(base_url, host, color, seconds, at=None, timeout=5.0, job=RUNTIME_JOB, opener=None):
    """``{requests, errors, error_ratio, p99_ms, queries}`` of one color over the ``seconds`` before ``at``.

    ``requests`` is None when Prometheus has no infer requests of that color in the window (not scraped yet, no
    traffic); then ratio and p99 are None too. Raises :class:`PrometheusError` when Prometheus cannot answer.
    """
    # One instant for all three queries: evaluated at "now" each, a window sliding between them gives a ratio of
    # two different windows (seen: 5.4 errors over 300 requests when 6 of 300 failed).
    kwargs = dict(at=time.time() if at is None else at, timeout=timeout)
    if opener is not None:
        kwargs["opener"] = opener
    exprs = window_queries(host, color, seconds, job=job)
    out = dict(requests=None, errors=None, error_ratio=None, p99_ms=None, queries=exprs)
    requests = scalar(base_url, exprs["requests"], **kwargs)
    if not requests:
        return out
    errors = scalar(base_url, exprs["errors"], **kwargs) or 0.0
    p99 = scalar(base_url, exprs["p99"], **kwargs)
    out.update(
        requests=round(requests, 3),
        errors=round(errors, 3),
        error_ratio=round(errors / requests, 6),
        p99_ms=round(p99 * 1000.0, 3) if p99 is not None and not math.isinf(p99) else None,
    )
    return out
