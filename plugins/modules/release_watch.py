#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: release_watch
short_description: Wait for a color to get ready, or watch it take traffic, during a release
version_added: 0.2.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._attributes.read_only
description:
  - The two waits of the release role (C(roles/release), docs/adr/0501-release-flow.md), on the inference host.
  - O(watch=ready) polls C(GET {url}/v2/health/ready) of one color's own port until it answers 200, for at most
    O(timeout) seconds. It fails at once when the runtime's readiness body says C(state) V(failed) (a golden
    mismatch, a model that cannot load, a registry that cannot be reached; waiting longer would not help), and on
    timeout. Either message quotes the runtime's own C(reason) from its last readiness body (for example the
    tracking server's host and port it cannot reach), not only the last poll's status, so a runtime that
    restarts between polls still gets its cause reported.
  - O(watch=traffic) is the watch window after a switch. It sends the model's golden inference request
    through the traffic switch's frontend O(url), one at a time on one keep-alive connection, for O(seconds),
    and counts as errors the non-200 answers, the transport errors and the answers from another color than
    O(color) (HAProxy's C(X-Sovereign-Color) header). It fails when the window is degraded - fewer than
    O(min_requests) requests, an error ratio above O(max_error_ratio), or a p99 (nearest rank, successful
    requests) above O(max_p99_ms) - with the figures in the result either way.
  - The golden request is O(golden), else the JSON file O(golden_file) on the host, else the model metadata's
    C(parameters.golden) read through O(url) (the example itself, or the path of the golden file the runtime
    used).
  - With O(prometheus_url) (the release role sets it when the inventory has a C(monitoring) host), the window's
    error ratio and p99 come from Prometheus instead - the runtime's own request counters and latency histogram of
    O(color) on O(prometheus_host) over the window (every client's traffic, not only the watch's), the same
    expressions as the alerts C(InferenceErrorRatioHigh) and C(InferenceLatencyP99High). The golden requests are
    sent all the same; they give the new color traffic to measure, they still catch answers from the wrong color
    (a degradation whatever the source), and their figures are the fallback. When Prometheus is unreachable,
    refuses the query, or has fewer than O(min_requests) infer requests of that color in the window (not scraped
    yet), the window is judged on the direct probes, with a warning and the cause in RV(prometheus_error).
    RV(source) says which was used; the release role records it in the ledger as C(watch_source).
options:
  watch:
    description:
      - V(ready) waits for a color's readiness; V(traffic) watches the live path after a switch.
    type: str
    choices: [ready, traffic]
    default: traffic
  url:
    description:
      - With O(watch=ready), the color's own base URL, for example C(http://127.0.0.1:8002).
      - With O(watch=traffic), the traffic switch's frontend, for example C(http://127.0.0.1:8000).
    type: str
    required: true
  color:
    description:
      - The color watched. With O(watch=traffic), an answer whose C(X-Sovereign-Color) header names another color is
        an error; with O(watch=ready), it names the color in messages.
    type: str
    required: true
  model_name:
    description:
      - The served model name (C(/v2/models/NAME)). Required with O(watch=traffic).
    type: str
  timeout:
    description:
      - O(watch=ready) only. Seconds to wait for readiness.
    type: float
    default: 180
  poll_interval:
    description:
      - O(watch=ready) only. Seconds between two readiness polls.
    type: float
    default: 1
  seconds:
    description:
      - O(watch=traffic) only. Length of the watch window. V(0) sends no request and reports a window that is not
        degraded (the caller chose not to watch).
    type: float
    default: 30
  interval:
    description:
      - O(watch=traffic) only. Seconds to sleep between two requests.
    type: float
    default: 0.05
  max_error_ratio:
    description:
      - O(watch=traffic) only. Largest acceptable ratio of errors to requests.
    type: float
    default: 0.01
  max_p99_ms:
    description:
      - O(watch=traffic) only. Largest acceptable 99th percentile latency of the successful requests.
    type: float
    default: 100
  min_requests:
    description:
      - O(watch=traffic) only. Fewest requests the window must complete (a frontend so slow that fewer complete is
        degraded).
    type: int
    default: 20
  golden:
    description:
      - O(watch=traffic) only. The golden example C({inputs, ...}); only its C(inputs) are sent.
    type: dict
  golden_file:
    description:
      - O(watch=traffic) only. A JSON file on the host holding the golden example, used when O(golden) is not
        given.
    type: path
  request_timeout:
    description:
      - Seconds allowed for each HTTP request.
    type: float
    default: 5
  prometheus_url:
    description:
      - O(watch=traffic) only. Base URL of a Prometheus that scrapes this host's runtimes (for example
        C(http://10.0.0.5:9090)); omitted or V("") - direct probes only.
    type: str
  prometheus_host:
    description:
      - The C(host) label of this host's runtime series in Prometheus (the prometheus role sets it to the inventory
        name). Required with O(prometheus_url).
    type: str
  prometheus_scrape_interval:
    description:
      - Seconds between two scrapes of the runtimes; the query's range is the window plus this, so the first
        scrape after the switch is inside it.
    type: float
    default: 15
  prometheus_timeout:
    description:
      - Seconds allowed for each Prometheus query.
    type: float
    default: 5
notes:
  - The watch's inference requests are real requests through the frontend; OIP inference is free of side effects.
seealso:
  - module: sovereign.mlops.smoke_test
  - module: sovereign.mlops.blue_green_switch
"""

EXAMPLES = r"""
- name: Wait until green is ready on its own port
  sovereign.mlops.release_watch:
    watch: ready
    url: http://127.0.0.1:8002
    color: green
    timeout: 180

- name: Watch green through the frontend for 30 s after the switch
  sovereign.mlops.release_watch:
    url: http://127.0.0.1:8000
    color: green
    model_name: fraud
    seconds: 30
    max_error_ratio: 0.01
    max_p99_ms: 100
  register: watch
"""

RETURN = r"""
ready:
  description: O(watch=ready) - whether the color answered 200.
  returned: watch=ready
  type: bool
  sample: false
state:
  description: O(watch=ready) - the C(state) of the last readiness body (V(loading), V(failed), ...), V(null) when
    no body had one.
  returned: watch=ready
  type: str
  sample: loading
reason:
  description:
    - O(watch=ready) - the C(reason) of the last readiness body that had one ("" when ready).
    - O(watch=traffic) - why the window is degraded ("" when it is not).
  returned: always
  type: str
  sample: "cannot reach the tracking server mlflow.internal:5000: connection refused"
waited_s:
  description: O(watch=ready) - seconds waited.
  returned: watch=ready
  type: float
  sample: 12.4
polls:
  description: O(watch=ready) - readiness requests sent.
  returned: watch=ready
  type: int
  sample: 13
last_answer:
  description: O(watch=ready) - the last poll's outcome, C(HTTP 503) or a transport error (C(connection refused)).
  returned: watch=ready
  type: str
  sample: connection refused
requests:
  description: O(watch=traffic) - requests sent in the window.
  returned: watch=traffic
  type: int
  sample: 412
errors:
  description: O(watch=traffic) - non-200 answers, transport errors and wrong-color answers.
  returned: watch=traffic
  type: int
  sample: 0
wrong_color:
  description: O(watch=traffic) - answers from another color than O(color).
  returned: watch=traffic
  type: int
  sample: 0
error_ratio:
  description: O(watch=traffic) - errors / requests, V(null) when no request was sent.
  returned: watch=traffic
  type: float
  sample: 0.0
p50_ms:
  description: O(watch=traffic) - median latency of the successful requests.
  returned: watch=traffic
  type: float
  sample: 3.2
p99_ms:
  description: O(watch=traffic) - 99th percentile latency (nearest rank) of the successful requests.
  returned: watch=traffic
  type: float
  sample: 7.9
error_samples:
  description: O(watch=traffic) - up to five errors as text.
  returned: watch=traffic
  type: list
  elements: str
  sample: ["503: no server available", "answered by blue, not green"]
degraded:
  description: O(watch=traffic) - whether the window failed its thresholds.
  returned: watch=traffic
  type: bool
  sample: false
source:
  description:
    - O(watch=traffic) - where RV(error_ratio), RV(p99_ms), RV(requests) and RV(errors) come from, and what the
      window was judged on - V(prometheus) or V(probes) (the golden requests through the frontend).
  returned: watch=traffic
  type: str
  sample: prometheus
prometheus_error:
  description: O(watch=traffic) - why Prometheus was not used although O(prometheus_url) was given ("" otherwise).
  returned: watch=traffic
  type: str
  sample: "cannot reach Prometheus at http://10.0.0.5:9090: [Errno 111] Connection refused"
probes:
  description: O(watch=traffic) - the direct probes' own figures (C(requests), C(errors), C(error_ratio), C(p99_ms)).
  returned: watch=traffic
  type: dict
  sample: {requests: 412, errors: 0, error_ratio: 0.0, p99_ms: 7.9}
prometheus:
  description:
    - O(watch=traffic) with O(prometheus_url) - Prometheus's figures (C(requests), C(errors), C(error_ratio),
      C(p99_ms), None without data) and the C(queries) asked.
  returned: when prometheus_url was given
  type: dict
"""

import json
import time
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._oip import (
    TRANSPORT_ERRORS,
    HTTPClient,
    URLError,
    describe_transport_error,
    excerpt,
    golden_request_body,
    http_get,
    percentile,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._prometheus import PrometheusError, color_window

MAX_SAMPLES = 5


def _readiness_body(data):
    """(state, reason) of a readiness body ({"ready": false, "state": ..., "reason": ...}); (None, None) else."""
    try:
        body = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    state, reason = body.get("state"), body.get("reason")
    return (str(state) if state is not None else None), (str(reason) if reason else None)


def wait_ready(url, color, timeout, poll_interval, request_timeout, clock=time.monotonic, sleep=time.sleep):
    """Poll ``url``/v2/health/ready; returns (ok, message, result)."""
    start = clock()
    deadline = start + timeout
    out = dict(ready=False, state=None, reason="", polls=0, waited_s=0.0, last_answer="")
    while True:
        out["polls"] += 1
        try:
            status, _headers, data = http_get(url.rstrip("/") + "/v2/health/ready", timeout=request_timeout)
        except TRANSPORT_ERRORS as exc:
            out["last_answer"] = describe_transport_error(exc)
        else:
            out["last_answer"] = f"HTTP {status}"
            if status == 200:
                out.update(ready=True, state="ready", reason="", waited_s=round(clock() - start, 3))
                return True, f"{color} is ready at {url}", out
            state, reason = _readiness_body(data)
            if state is not None:
                out["state"] = state
            if reason:
                out["reason"] = reason
            elif state is None and not out["reason"]:
                out["reason"] = f"HTTP {status}: {excerpt(data)}"
            if state == "failed":
                out["waited_s"] = round(clock() - start, 3)
                return (
                    False,
                    f"{color} did not become ready at {url}: the runtime reports state 'failed' after "
                    f"{out['waited_s']:.0f}s ({out['reason'] or 'no reason given'}); waiting longer would not help.",
                    out,
                )
        now = clock()
        if now >= deadline:
            out["waited_s"] = round(now - start, 3)
            cause = out["reason"] or "no readiness body"
            if out["state"]:
                cause += f"; state {out['state']}"
            if out["last_answer"] and not out["last_answer"].startswith("HTTP "):
                cause += f"; last poll: {out['last_answer']}"
            return False, f"{color} did not become ready at {url} within {timeout:g}s ({cause}).", out
        sleep(min(poll_interval, max(0.0, deadline - now)))


def judge(requests, errors, p99_ms, max_error_ratio, max_p99_ms, min_requests):
    """(degraded, reason) for the figures of one watch window."""
    if requests < min_requests:
        return True, f"only {requests} requests completed in the watch window (minimum {min_requests})"
    ratio = errors / requests if requests else 1.0
    if ratio > max_error_ratio:
        return True, f"error ratio {ratio:.4f} ({errors}/{requests}) > {max_error_ratio:g}"
    if p99_ms is None:
        return True, "no successful request to measure latency"
    if p99_ms > max_p99_ms:
        return True, f"p99 {p99_ms:.1f} ms > {max_p99_ms:g} ms"
    return False, ""


def prometheus_figures(p, wall=time.time):
    """Prometheus's figures of the window, or (None, why not)."""
    try:
        figures = color_window(
            p["prometheus_url"],
            p["prometheus_host"],
            p["color"],
            p["seconds"] + p["prometheus_scrape_interval"],
            at=wall(),
            timeout=p["prometheus_timeout"],
        )
    except PrometheusError as exc:
        why = str(exc)
    else:
        if figures["requests"] is not None and figures["requests"] >= p["min_requests"]:
            return figures, ""
        why = (
            f"Prometheus at {p['prometheus_url']} has {figures['requests'] or 0:g} infer requests of {p['color']} on "
            f"host {p['prometheus_host']} in the window (fewer than min_requests={p['min_requests']}; not scraped "
            "yet, or another host label)"
        )
        return figures, why
    return None, why


def watch_traffic(p, clock=time.monotonic, sleep=time.sleep, warn=lambda msg: None, wall=time.time):
    """Run the watch window; returns (ok, message, result)."""
    out = dict(requests=0, errors=0, wrong_color=0, error_ratio=None, p50_ms=None, p99_ms=None)
    out.update(error_samples=[], degraded=False, reason="", source="probes", prometheus_error="")
    if p["seconds"] <= 0:
        return True, "no watch window (seconds is 0)", out
    client = HTTPClient(p["url"], timeout=p["request_timeout"])
    try:
        try:
            body = golden_request_body(p["golden"], p["golden_file"], client, p["model_name"])
        except (ValueError, *TRANSPORT_ERRORS) as exc:
            out.update(degraded=True, reason=f"could not read the golden example through {p['url']}: {exc}")
            return False, f"{p['color']} could not be watched: {out['reason']}", out
        path = f"/v2/models/{urllib.parse.quote(p['model_name'])}/infer"
        latencies, samples = [], []
        deadline = clock() + p["seconds"]
        while clock() < deadline:
            sample = None
            try:
                status, headers, data, seconds = client.request("POST", path, body)
            except TRANSPORT_ERRORS as exc:
                out["errors"] += 1
                sample = f"transport: {describe_transport_error(exc)}"
            else:
                answered_by = headers.get("x-sovereign-color")
                if status != 200:
                    out["errors"] += 1
                    sample = f"{status}: {excerpt(data, 120)}"
                elif answered_by and answered_by != p["color"]:
                    out["errors"] += 1
                    out["wrong_color"] += 1
                    sample = f"answered by {answered_by}, not {p['color']}"
                else:
                    latencies.append(seconds * 1000.0)
            if sample and len(samples) < MAX_SAMPLES:
                samples.append(sample)
            out["requests"] += 1
            if p["interval"] > 0:
                sleep(p["interval"])
    finally:
        client.close()
    p99 = percentile(latencies, 99)
    out.update(
        error_ratio=round(out["errors"] / out["requests"], 6) if out["requests"] else None,
        p50_ms=round(percentile(latencies, 50), 3) if latencies else None,
        p99_ms=round(p99, 3) if p99 is not None else None,
        error_samples=samples,
    )
    out["probes"] = {k: out[k] for k in ("requests", "errors", "error_ratio", "p99_ms")}
    prom = None
    if p["prometheus_url"]:
        prom, out["prometheus_error"] = prometheus_figures(p, wall)
        if out["prometheus_error"]:
            warn(f"watch window judged on direct probes: {out['prometheus_error']}")
        out["prometheus"] = prom or {}
        prom = None if out["prometheus_error"] else prom
    if prom:
        out.update(source="prometheus", requests=prom["requests"], errors=prom["errors"])
        out.update(error_ratio=prom["error_ratio"], p99_ms=prom["p99_ms"])
        degraded, reason = judge(
            prom["requests"], prom["errors"], prom["p99_ms"], p["max_error_ratio"], p["max_p99_ms"], p["min_requests"]
        )
        if not degraded and out["wrong_color"]:
            degraded, reason = True, f"{out['wrong_color']} watch requests answered by another color than {p['color']}"
    else:
        degraded, reason = judge(
            out["requests"], out["errors"], p99, p["max_error_ratio"], p["max_p99_ms"], p["min_requests"]
        )
    out.update(degraded=degraded, reason=reason)
    where = f"Prometheus {p['prometheus_url']}" if prom else f"probes through {p['url']}"
    if degraded:
        figures = f"{out['requests']} requests, {out['errors']} errors, p99 {out['p99_ms']} ms; samples {samples}"
        msg = f"{p['color']} degraded after taking traffic ({where}): {reason} (watch: {figures})."
        return False, msg, out
    held = f"{p['color']} held for {p['seconds']:g}s ({where}): {out['requests']} requests, p99 {out['p99_ms']} ms"
    return True, held, out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            watch=dict(type="str", choices=["ready", "traffic"], default="traffic"),
            url=dict(type="str", required=True),
            color=dict(type="str", required=True),
            model_name=dict(type="str"),
            timeout=dict(type="float", default=180.0),
            poll_interval=dict(type="float", default=1.0),
            seconds=dict(type="float", default=30.0),
            interval=dict(type="float", default=0.05),
            max_error_ratio=dict(type="float", default=0.01),
            max_p99_ms=dict(type="float", default=100.0),
            min_requests=dict(type="int", default=20),
            golden=dict(type="dict"),
            golden_file=dict(type="path"),
            request_timeout=dict(type="float", default=5.0),
            prometheus_url=dict(type="str"),
            prometheus_host=dict(type="str"),
            prometheus_scrape_interval=dict(type="float", default=15.0),
            prometheus_timeout=dict(type="float", default=5.0),
        ),
        required_if=[("watch", "traffic", ("model_name",))],
        required_by={"prometheus_url": ("prometheus_host",)},
        mutually_exclusive=[("golden", "golden_file")],
        supports_check_mode=True,
    )
    p = module.params
    for name in (
        "timeout",
        "poll_interval",
        "seconds",
        "interval",
        "max_error_ratio",
        "request_timeout",
        "prometheus_scrape_interval",
        "prometheus_timeout",
    ):
        if p[name] < 0:
            module.fail_json(msg=f"{name} must be >= 0, got {p[name]:g}")
    if p["request_timeout"] == 0 or p["max_p99_ms"] <= 0:
        module.fail_json(msg="request_timeout and max_p99_ms must be > 0")
    try:
        if p["watch"] == "ready":
            ok, msg, out = wait_ready(p["url"], p["color"], p["timeout"], p["poll_interval"], p["request_timeout"])
        else:
            ok, msg, out = watch_traffic(p, warn=module.warn)
    except URLError as exc:
        module.fail_json(msg=str(exc))
    if not ok:
        module.fail_json(msg=msg, changed=False, **out)
    module.exit_json(msg=msg, changed=False, **out)


if __name__ == "__main__":
    main()
