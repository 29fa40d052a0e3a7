# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Watch window of playbooks/deploy.yml, run on the inference host (python3 stdlib only).

Sends the model's golden inference request through the traffic switch's frontend, one at a time on a
keep-alive connection, for SECONDS, and prints one JSON object: requests, errors (non-200, transport errors,
answers from another color than COLOR), error_ratio, p50/p99 (nearest rank, successful requests), degraded
(bool) and reason. Exit status 0 whatever it measured (the playbook decides); 2 on bad arguments.

usage: release_watch.py URL MODEL COLOR SECONDS INTERVAL MAX_ERROR_RATIO MAX_P99_MS MIN_REQUESTS [GOLDEN_FILE]

The request is the golden input of GOLDEN_FILE when given (and not empty), else of the model's metadata
(parameters.golden: the example itself, or the path of the golden file the runtime used).
"""

from __future__ import annotations

import http.client
import json
import math
import sys
import time
import urllib.parse


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def judge(requests, errors, p99_ms, max_error_ratio, max_p99_ms, min_requests):
    """(degraded, reason) for the figures of one watch window."""
    if requests < min_requests:
        return True, f"only {requests} requests completed in the watch window (minimum {min_requests})"
    ratio = errors / requests if requests else 1.0
    if ratio > max_error_ratio:
        return True, f"error ratio {ratio:.4f} ({errors}/{requests}) > {max_error_ratio}"
    if p99_ms is None:
        return True, "no successful request to measure latency"
    if p99_ms > max_p99_ms:
        return True, f"p99 {p99_ms:.1f} ms > {max_p99_ms} ms"
    return False, ""


class Client:
    def __init__(self, url, timeout=5.0):
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, resp.getheader("X-Sovereign-Color"), data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the server closed while idle: reopen once, as any client would.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def load_golden(value):
    """A golden example from a mapping, a JSON string, or the path of a JSON file."""
    if isinstance(value, str) and value.strip().startswith("{"):
        return json.loads(value)
    if isinstance(value, str) and value:
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    return value


def golden_request(client, model, golden_file=""):
    if golden_file:
        golden = load_golden(golden_file)
    else:
        status, _color, data = client.request("GET", f"/v2/models/{urllib.parse.quote(model)}")
        if status != 200:
            raise RuntimeError(f"model metadata answered {status}: {data[:200]!r}")
        golden = load_golden(json.loads(data).get("parameters", {}).get("golden"))
    if not isinstance(golden, dict) or not golden.get("inputs"):
        raise RuntimeError("the model metadata has no golden example (parameters.golden)")
    return json.dumps({"inputs": golden["inputs"]}).encode()


def main(argv):
    if len(argv) not in (9, 10):
        print(__doc__, file=sys.stderr)
        return 2
    url, model, color = argv[1], argv[2], argv[3]
    seconds, interval = float(argv[4]), float(argv[5])
    max_error_ratio, max_p99_ms, min_requests = float(argv[6]), float(argv[7]), int(argv[8])
    client = Client(url)
    out = dict(url=url, model=model, color=color, seconds=seconds, requests=0, errors=0, wrong_color=0)
    try:
        body = golden_request(client, model, argv[9] if len(argv) == 10 else "")
    except Exception as exc:  # any failure to start watching is a degradation
        out.update(degraded=True, reason=f"could not read the golden example through {url}: {exc}")
        print(json.dumps(out))
        return 0
    path = f"/v2/models/{urllib.parse.quote(model)}/infer"
    latencies = []
    errors = wrong_color = 0
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            status, answered_by, data = client.request("POST", path, body)
            ms = (time.perf_counter() - start) * 1000.0
            if status != 200:
                errors += 1
                if len(samples) < 5:
                    samples.append(f"{status}: {data[:120].decode('utf-8', 'replace')}")
            elif answered_by and answered_by != color:
                wrong_color += 1
                errors += 1
                if len(samples) < 5:
                    samples.append(f"answered by {answered_by}, not {color}")
            else:
                latencies.append(ms)
        except (OSError, http.client.HTTPException) as exc:
            errors += 1
            client.close()
            if len(samples) < 5:
                samples.append(f"transport: {exc}")
        out["requests"] += 1
        if interval > 0:
            time.sleep(interval)
    client.close()
    p99 = percentile(latencies, 99)
    degraded, reason = judge(out["requests"], errors, p99, max_error_ratio, max_p99_ms, min_requests)
    out.update(
        errors=errors,
        wrong_color=wrong_color,
        error_ratio=round(errors / out["requests"], 6) if out["requests"] else None,
        p50_ms=round(percentile(latencies, 50), 3) if latencies else None,
        p99_ms=round(p99, 3) if p99 is not None else None,
        error_samples=samples,
        degraded=degraded,
        reason=reason,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
