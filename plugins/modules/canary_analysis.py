#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: canary_analysis
short_description: Judge a canary color against the stable one during a weighted split
version_added: 0.3.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._attributes.read_only
description:
  - One analysis step of the release role's canary (C(deploy.yml -e strategy=canary), docs/adr/1402-canary-release.md),
    on the inference host, while the traffic switch splits requests between O(canary) and O(stable)
    (C(sovereign.mlops.blue_green_switch) with C(weight)).
  - For O(seconds) it sends the model's golden inference request through the frontend O(url), alternating between a
    sticky key (header O(sticky_header)) that the split sends to the canary and one it sends to the stable color
    (C(crc32(key) mod 100) below or at least O(weight)), each arm on its own keep-alive connection. An answer that is
    not 200, a transport error, or an answer from the other color (C(X-Sovereign-Color)) is an error of the arm it
    was meant for.
  - With O(prometheus_url) (the release role sets it when the inventory has a C(monitoring) host), the arms are
    judged on Prometheus's figures of each color on O(prometheus_host) over the analysis (every client's requests,
    the runtime's own latency histogram); answers from the wrong color seen by the probes still fail it. When
    Prometheus cannot answer, the probes judge, with a warning (RV(prometheus_error)). O(queries) are PromQL queries
    of the user, each with a C(min) and/or C(max) for the canary's value.
  - "The verdict: V(fail) when a check fails - the canary's error ratio above O(max_error_ratio), its p99 above
    O(max_p99_ms), or above the stable p99 times O(max_p99_ratio) (and more than O(p99_tolerance_ms) above it), or
    a user query out of bounds; V(inconclusive) when an arm has fewer than O(min_requests) requests or a query has
    no value - then it holds for O(seconds) more, up to O(max_seconds) in all; V(pass) otherwise. Errors that no
    sample could dilute fail at once."
  - The module fails unless the verdict is V(pass), with the measurements that failed in its message and every
    check in RV(checks). It changes nothing; the caller sets the weight to 0 on failure.
  - The analysis ends, without a result, when nobody will read it any more - the C(ansible-playbook) that started it
    was killed. The module's action plugin ends its worker and connection on the controller when
    C(ansible-playbook) is gone, and the module stops probing within a second of its stdout closing
    (docs/adr/1403-analysis-outlives-no-controller.md).
options:
  url:
    description:
      - The traffic switch's frontend as seen from the host, for example C(http://127.0.0.1:8000).
    type: str
    required: true
  canary:
    description:
      - The color under analysis (the one the split gives O(weight) percent).
    type: str
    required: true
    choices: [blue, green]
  stable:
    description:
      - The color it is compared with (the live color). Defaults to the other color.
    type: str
    choices: [blue, green]
  weight:
    description:
      - The canary's current weight (1-99), to choose the probes' sticky keys.
    type: int
    required: true
  sticky_header:
    description:
      - The traffic switch's sticky-key header (C(traffic_switch_sticky_header)).
    type: str
    default: X-Sovereign-Key
  model_name:
    description:
      - The served model name (C(/v2/models/NAME)).
    type: str
    required: true
  golden:
    description:
      - The golden example C({inputs, ...}); only its C(inputs) are sent. Else the model metadata's through O(url).
    type: dict
  seconds:
    description:
      - How long one hold lasts; an inconclusive hold is followed by another, up to O(max_seconds).
    type: float
    default: 30
  max_seconds:
    description:
      - The longest the analysis may hold in all before an inconclusive verdict is final (the module then fails).
    type: float
    default: 120
  interval:
    description:
      - Seconds to sleep between two probe requests.
    type: float
    default: 0.05
  min_requests:
    description:
      - Fewest requests each arm needs in the analysis before it is judged.
    type: int
    default: 20
  max_error_ratio:
    description:
      - Largest acceptable error ratio of the canary.
    type: float
    default: 0.01
  max_p99_ms:
    description:
      - Largest acceptable p99 latency of the canary (ms).
    type: float
    default: 100
  max_p99_ratio:
    description:
      - The canary's p99 may be at most this times the stable p99 (or O(p99_tolerance_ms) above it, whichever is
        larger). V(0) turns the comparison off.
    type: float
    default: 1.5
  p99_tolerance_ms:
    description:
      - Milliseconds the canary's p99 may always exceed the stable p99 by.
    type: float
    default: 10
  queries:
    description:
      - User checks, each a mapping with C(name), C(query) (PromQL; C($color) is the canary, C($stable), C($host),
        C($window) the analysis so far, e.g. C(30s)) and C(min) and/or C(max) for the canary's value. Need
        O(prometheus_url).
    type: list
    elements: dict
    default: []
  request_timeout:
    description:
      - Seconds allowed for each HTTP request.
    type: float
    default: 5
  prometheus_url:
    description:
      - Base URL of a Prometheus scraping this host's runtimes; omitted or V("") - direct probes only.
    type: str
  prometheus_host:
    description:
      - The C(host) label of this host's runtime series. Required with O(prometheus_url).
    type: str
  prometheus_scrape_interval:
    description:
      - Seconds between two scrapes; the query's range is the analysis plus this.
    type: float
    default: 15
  prometheus_timeout:
    description:
      - Seconds allowed for each Prometheus query.
    type: float
    default: 5
notes:
  - The probes are real inference requests through the frontend; OIP inference is free of side effects.
seealso:
  - module: sovereign.mlops.blue_green_switch
  - module: sovereign.mlops.release_watch
"""

EXAMPLES = r"""
- name: Split 5 % to green
  sovereign.mlops.blue_green_switch:
    color: green
    weight: 5

- name: Analyse green against blue for 30 s (up to 2 min when there are too few requests)
  sovereign.mlops.canary_analysis:
    url: http://127.0.0.1:8000
    canary: green
    weight: 5
    model_name: fraud
    seconds: 30
    max_seconds: 120
    max_error_ratio: 0.01
    max_p99_ms: 100
    queries:
      - name: fraud_rate
        query: >-
          sum(rate(fraud_flagged_total{color="$color"}[$window]))
          / sum(rate(requests_total{color="$color"}[$window]))
        max: 0.05
  register: analysis
"""

RETURN = r"""
verdict:
  description: V(pass), V(fail) or V(inconclusive) (still so at O(max_seconds)).
  returned: always
  type: str
  sample: pass
checks:
  description: Every check of the final verdict - C(name), C(value), C(limit), C(ok) (true, false, or null when not
    measurable), C(detail).
  returned: always
  type: list
  elements: dict
failed_checks:
  description: The details of the checks that failed.
  returned: always
  type: list
  elements: str
  sample: ["canary p99 152.3 ms vs limit 100 ms"]
canary:
  description: The canary's figures the verdict used (C(requests), C(errors), C(error_ratio), C(p50_ms), C(p99_ms)).
  returned: always
  type: dict
stable:
  description: The stable color's figures the verdict used.
  returned: always
  type: dict
probes:
  description: The probes' own figures per arm (C(canary), C(stable)), whatever the source.
  returned: always
  type: dict
source:
  description: Where the figures come from - V(prometheus) or V(probes).
  returned: always
  type: str
  sample: probes
prometheus_error:
  description: Why Prometheus was not used although O(prometheus_url) was given ("" otherwise).
  returned: always
  type: str
holds:
  description: How many holds of O(seconds) ran (more than 1 after inconclusive ones).
  returned: always
  type: int
  sample: 1
started:
  description: When the analysis started (seconds since the epoch, the host's clock).
  returned: always
  type: float
ended:
  description: When it ended.
  returned: always
  type: float
keys:
  description: The sticky keys the probes used per arm (C(canary), C(stable)).
  returned: always
  type: dict
  sample: {canary: sovereign-probe-3, stable: sovereign-probe-0}
"""

import os
import select
import time
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._canary import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    arm_figures,
    failed_checks,
    judge,
    render_query,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._haproxy import BUCKETS, key_in_range
from ansible_collections.sovereign.mlops.plugins.module_utils._oip import (
    TRANSPORT_ERRORS,
    HTTPClient,
    URLError,
    describe_transport_error,
    excerpt,
    golden_request_body,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._prometheus import PrometheusError, color_window, scalar

COLORS = ("blue", "green")
MAX_SAMPLES = 5
ORPHAN_CHECK_S = 1.0


class ControllerGone(Exception):
    """Nobody will read this analysis: the ansible-playbook that started it is gone."""


# The process that started this module (Ansible's shell, sudo or async wrapper): it waits for the module to end.
_START_PARENT = os.getppid()


def controller_gone(fd=1, parent=_START_PARENT):
    """True when nobody will read this module's result: its stdout is a pipe whose reader has closed, or the process
    that started it is gone (this one was reparented). Either way the ansible-playbook (or its SSH session) that ran
    the module was killed, and probing on for the rest of a long hold would only load the host (and skew what runs
    next on it, an experiment's counts). Neither fires while the controller's worker lives on: Ansible detaches its
    workers from ansible-playbook, so a SIGKILLed ansible-playbook leaves the worker holding the pipe and the shell
    chain above this process alive (molecule/progressive, 2026-12-01 21:28) - this module's action plugin ends that
    worker, which closes the pipe (plugin_utils/_controller_watch.py). A file or terminal never reports a closed
    reader."""
    if os.getppid() != parent:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _fd, event in poller.poll(0))
    except (OSError, ValueError):
        return False


class Arm:
    """One arm's probe: a keep-alive connection, a sticky key, its observations."""

    def __init__(self, url, color, key, header, timeout):
        self.color = color
        self.key = key
        self.headers = {header: key, "Content-Type": "application/json"}
        self.client = HTTPClient(url, timeout=timeout)
        self.latencies = []
        self.errors = 0
        self.wrong_color = 0
        self.samples = []

    def probe(self, path, body):
        sample = None
        try:
            status, headers, data, seconds = self.client.request("POST", path, body, headers=self.headers)
        except TRANSPORT_ERRORS as exc:
            self.errors += 1
            sample = f"transport: {describe_transport_error(exc)}"
        else:
            answered_by = headers.get("x-sovereign-color")
            if status != 200:
                self.errors += 1
                sample = f"{status} from {answered_by or '?'}: {excerpt(data, 120)}"
            elif answered_by != self.color:
                self.errors += 1
                self.wrong_color += 1
                sample = f"answered by {answered_by or '(no X-Sovereign-Color)'}, not {self.color}"
            else:
                self.latencies.append(seconds * 1000.0)
        if sample and len(self.samples) < MAX_SAMPLES:
            self.samples.append(sample)

    def figures(self):
        out = arm_figures(self.latencies, self.errors, self.wrong_color)
        out["error_samples"] = list(self.samples)
        return out

    def close(self):
        self.client.close()


def prometheus_arms(p, stable, elapsed, wall):
    """(canary figures, stable figures, error) from Prometheus over the analysis so far."""
    seconds = elapsed + p["prometheus_scrape_interval"]
    kwargs = dict(at=wall(), timeout=p["prometheus_timeout"])
    try:
        canary = color_window(p["prometheus_url"], p["prometheus_host"], p["canary"], seconds, **kwargs)
        base = color_window(p["prometheus_url"], p["prometheus_host"], stable, seconds, **kwargs)
    except PrometheusError as exc:
        return None, None, str(exc)
    for arm in (canary, base):
        arm.pop("queries", None)
        arm["requests"] = arm["requests"] or 0
        arm["errors"] = arm["errors"] or 0
    return canary, base, ""


def user_queries(p, stable, elapsed, wall):
    out = []
    for item in p["queries"]:
        entry = dict(name=item["name"], min=item.get("min"), max=item.get("max"), value=None, error="")
        try:
            promql = render_query(item["query"], p["canary"], stable, p["prometheus_host"], elapsed)
            entry["query"] = promql
            entry["value"] = scalar(p["prometheus_url"], promql, at=wall(), timeout=p["prometheus_timeout"])
            if entry["value"] is None:
                entry["error"] = "empty result"
        except (PrometheusError, ValueError) as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def analyse(p, warn=lambda msg: None, clock=time.monotonic, sleep=time.sleep, wall=time.time, gone=controller_gone):
    """Run the analysis; returns (ok, message, result). Raises ControllerGone when ``gone()`` says nobody is waiting
    for it any more (checked every ORPHAN_CHECK_S while probing)."""
    stable = p["stable"] or next(c for c in COLORS if c != p["canary"])
    keys = dict(canary=key_in_range(0, p["weight"]), stable=key_in_range(p["weight"], BUCKETS))
    limits = {k: p[k] for k in ("min_requests", "max_error_ratio", "max_p99_ms", "max_p99_ratio", "p99_tolerance_ms")}
    out = dict(verdict=INCONCLUSIVE, checks=[], failed_checks=[], canary={}, stable={}, probes={}, source="probes")
    out.update(prometheus_error="", holds=0, started=round(wall(), 3), ended=None, keys=keys, queries=[])
    arms = [
        Arm(p["url"], p["canary"], keys["canary"], p["sticky_header"], p["request_timeout"]),
        Arm(p["url"], stable, keys["stable"], p["sticky_header"], p["request_timeout"]),
    ]
    path = f"/v2/models/{urllib.parse.quote(p['model_name'])}/infer"
    start = clock()
    try:
        try:
            body = golden_request_body(p["golden"], None, arms[0].client, p["model_name"])
        except (ValueError, OSError, *TRANSPORT_ERRORS) as exc:
            out.update(verdict=FAIL, ended=round(wall(), 3))
            out["failed_checks"] = [f"could not read the golden example through {p['url']}: {exc}"]
            return False, f"canary {p['canary']} could not be analysed: {out['failed_checks'][0]}", out
        while True:
            out["holds"] += 1
            hold_end = min(clock() + p["seconds"], start + max(p["max_seconds"], p["seconds"]))
            turn = 0
            next_check = clock() + ORPHAN_CHECK_S
            while clock() < hold_end:
                arms[turn % 2].probe(path, body)
                turn += 1
                if clock() >= next_check:
                    next_check = clock() + ORPHAN_CHECK_S
                    if gone():
                        raise ControllerGone()
                if p["interval"] > 0:
                    sleep(p["interval"])
            probes = dict(canary=arms[0].figures(), stable=arms[1].figures())
            out["probes"] = probes
            canary_fig, stable_fig, source = probes["canary"], probes["stable"], "probes"
            elapsed = clock() - start
            if p["prometheus_url"]:
                prom_c, prom_s, error = prometheus_arms(p, stable, elapsed, wall)
                if not error and (prom_c["requests"] < p["min_requests"] or prom_s["requests"] < p["min_requests"]):
                    error = (
                        f"Prometheus at {p['prometheus_url']} has {prom_c['requests']:g} infer requests of "
                        f"{p['canary']} and {prom_s['requests']:g} of {stable} on host {p['prometheus_host']} "
                        f"(fewer than min_requests={p['min_requests']}; not scraped yet, or another host label)"
                    )
                out["prometheus_error"] = error
                if error:
                    warn(f"canary analysis judged on direct probes: {error}")
                else:
                    canary_fig, stable_fig, source = prom_c, prom_s, "prometheus"
            queries = user_queries(p, stable, elapsed, wall) if p["queries"] else []
            verdict, checks = judge(canary_fig, stable_fig, limits, queries)
            wrong = probes["canary"]["wrong_color"] + probes["stable"]["wrong_color"]
            if source == "prometheus" and wrong and verdict != FAIL:
                verdict = FAIL
                checks.append(
                    dict(
                        name="wrong_color",
                        value=wrong,
                        limit=0,
                        ok=False,
                        detail=f"{wrong} probe requests answered by the other color than their key's arm",
                    )
                )
            out.update(verdict=verdict, checks=checks, failed_checks=failed_checks(checks), queries=queries)
            out.update(canary=canary_fig, stable=stable_fig, source=source)
            if verdict != INCONCLUSIVE or clock() - start >= p["max_seconds"]:
                break
    finally:
        for arm in arms:
            arm.close()
    out["ended"] = round(wall(), 3)
    where = f"Prometheus {p['prometheus_url']}" if out["source"] == "prometheus" else f"probes through {p['url']}"
    summary = (
        "canary {} {} vs stable {} ({}, {} hold(s), {:.0f}s): canary {} requests, error ratio {}, p99 {} ms; "
        "stable {} requests, error ratio {}, p99 {} ms".format(
            p["canary"],
            f"{p['weight']}%",
            stable,
            where,
            out["holds"],
            clock() - start,
            out["canary"].get("requests"),
            out["canary"].get("error_ratio"),
            out["canary"].get("p99_ms"),
            out["stable"].get("requests"),
            out["stable"].get("error_ratio"),
            out["stable"].get("p99_ms"),
        )
    )
    if out["verdict"] == PASS:
        return True, f"passed: {summary}", out
    if out["verdict"] == FAIL:
        samples = out["probes"].get("canary", {}).get("error_samples") or []
        return (
            False,
            "canary analysis failed: {} ({}{})".format(
                "; ".join(out["failed_checks"]), summary, f"; canary error samples {samples}" if samples else ""
            ),
            out,
        )
    pending = [c["detail"] for c in out["checks"] if c["ok"] is None]
    return (
        False,
        "canary analysis inconclusive after {:g}s (max_seconds): {} ({})".format(
            p["max_seconds"], "; ".join(pending), summary
        ),
        out,
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str", required=True),
            canary=dict(type="str", required=True, choices=list(COLORS)),
            stable=dict(type="str", choices=list(COLORS)),
            weight=dict(type="int", required=True),
            sticky_header=dict(type="str", default="X-Sovereign-Key"),
            model_name=dict(type="str", required=True),
            golden=dict(type="dict"),
            seconds=dict(type="float", default=30.0),
            max_seconds=dict(type="float", default=120.0),
            interval=dict(type="float", default=0.05),
            min_requests=dict(type="int", default=20),
            max_error_ratio=dict(type="float", default=0.01),
            max_p99_ms=dict(type="float", default=100.0),
            max_p99_ratio=dict(type="float", default=1.5),
            p99_tolerance_ms=dict(type="float", default=10.0),
            queries=dict(type="list", elements="dict", default=[]),
            request_timeout=dict(type="float", default=5.0),
            prometheus_url=dict(type="str"),
            prometheus_host=dict(type="str"),
            prometheus_scrape_interval=dict(type="float", default=15.0),
            prometheus_timeout=dict(type="float", default=5.0),
        ),
        required_by={"prometheus_url": ("prometheus_host",)},
        supports_check_mode=True,
    )
    p = module.params
    problems = []
    if p["stable"] == p["canary"]:
        problems.append(f"stable must be the other color than canary ({p['canary']})")
    if not 1 <= p["weight"] <= BUCKETS - 1:
        problems.append(f"weight must be between 1 and 99 during an analysis, got {p['weight']}")
    for name in ("seconds", "request_timeout"):
        if p[name] <= 0:
            problems.append(f"{name} must be > 0, got {p[name]:g}")
    for name in ("interval", "max_error_ratio", "max_p99_ratio", "p99_tolerance_ms", "prometheus_scrape_interval"):
        if p[name] < 0:
            problems.append(f"{name} must be >= 0, got {p[name]:g}")
    if p["max_seconds"] < p["seconds"]:
        problems.append(f"max_seconds ({p['max_seconds']:g}) must be >= seconds ({p['seconds']:g})")
    if p["min_requests"] < 1 or p["max_p99_ms"] <= 0:
        problems.append("min_requests must be >= 1 and max_p99_ms > 0")
    for item in p["queries"]:
        if not item.get("name") or not item.get("query") or (item.get("min") is None and item.get("max") is None):
            problems.append(f"each query needs a name, a query and a min and/or max, got {item!r}")
    if p["queries"] and not p["prometheus_url"]:
        problems.append("queries need prometheus_url (a monitoring host)")
    if problems:
        module.fail_json(msg="; ".join(problems))
    try:
        ok, msg, out = analyse(p, warn=module.warn)
    except URLError as exc:
        module.fail_json(msg=str(exc))
    except ControllerGone:
        os._exit(1)  # pylint: disable=protected-access  # nobody reads a result: stop probing, write nothing
    if not ok:
        module.fail_json(msg=msg, changed=False, **out)
    module.exit_json(msg=msg, changed=False, **out)


if __name__ == "__main__":
    main()
