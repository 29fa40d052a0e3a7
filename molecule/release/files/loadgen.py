"""Bounded keep-alive load generator (python3 stdlib; a test tool of molecule/release and benchmarks/switch).

THREADS clients, each on one keep-alive HTTP/1.1 connection, POST the golden inference request of MODEL to URL
back to back. Stops when STOP_FILE exists and at least MIN_REQUESTS were sent, or at MAX_REQUESTS, or after
MAX_SECONDS, whichever comes first. A request fails on any transport error (a closed keep-alive connection
included: no retry) or any status other than 200. Writes one JSON object to OUT (atomically): requests,
failures, by_color, status counts, error samples, p50/p99 overall and per second.

usage: loadgen.py URL MODEL THREADS MIN_REQUESTS MAX_REQUESTS MAX_SECONDS STOP_FILE OUT
"""

from __future__ import annotations

import http.client
import json
import math
import os
import sys
import threading
import time
import urllib.parse


def pct(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


def main(argv):
    url, model = argv[1], argv[2]
    threads, min_requests, max_requests = int(argv[3]), int(argv[4]), int(argv[5])
    max_seconds, stop_file, out = float(argv[6]), argv[7], argv[8]
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    conn.request("GET", f"/v2/models/{model}")
    meta = json.loads(conn.getresponse().read())
    conn.close()
    golden = meta["parameters"]["golden"]
    if isinstance(golden, str):  # the example as JSON, or the path of the golden file the runtime used
        if golden.strip().startswith("{"):
            golden = json.loads(golden)
        else:
            with open(golden, encoding="utf-8") as handle:
                golden = json.load(handle)
    body = json.dumps({"inputs": golden["inputs"]}).encode()
    path = f"/v2/models/{model}/infer"

    lock = threading.Lock()
    state = dict(requests=0, failures=0, by_color={}, status={}, samples=[], stop=False)
    lat = []  # (t since start, ms)
    t0 = time.monotonic()
    deadline = t0 + max_seconds

    def worker():
        c = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
        local = []
        while True:
            with lock:
                if state["stop"] or state["requests"] >= max_requests:
                    break
                state["requests"] += 1
            start = time.perf_counter()
            try:
                c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                ms = (time.perf_counter() - start) * 1000.0
                color = r.getheader("X-Sovereign-Color") or "?"
                ok = r.status == 200
                with lock:
                    state["status"][str(r.status)] = state["status"].get(str(r.status), 0) + 1
                    state["by_color"][color] = state["by_color"].get(color, 0) + 1
                    if not ok:
                        state["failures"] += 1
                        if len(state["samples"]) < 10:
                            state["samples"].append(f"{r.status} from {color}")
                if ok:
                    local.append((time.monotonic() - t0, ms))
                if r.getheader("Connection", "").lower() == "close":
                    c.close()
                    c = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
            except Exception as exc:  # every failure counts
                with lock:
                    state["failures"] += 1
                    if len(state["samples"]) < 10:
                        state["samples"].append(f"{type(exc).__name__}: {exc}")
                c.close()
                c = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
        c.close()
        with lock:
            lat.extend(local)

    pool = [threading.Thread(target=worker, daemon=True) for _index in range(threads)]
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        time.sleep(0.1)
        with lock:
            done = state["requests"]
        now = time.monotonic()
        if now >= deadline or (os.path.exists(stop_file) and done >= min_requests):
            with lock:
                state["stop"] = True
    for t in pool:
        t.join()
    elapsed = time.monotonic() - t0
    ms = [m for _t, m in lat]
    per_second = {}
    for t, m in lat:
        per_second.setdefault(int(t), []).append(m)
    result = dict(
        requests=state["requests"],
        failures=state["failures"],
        by_color=state["by_color"],
        status=state["status"],
        error_samples=state["samples"],
        seconds=round(elapsed, 2),
        rps=round(state["requests"] / elapsed, 1) if elapsed else None,
        p50_ms=round(pct(ms, 50), 3) if ms else None,
        p99_ms=round(pct(ms, 99), 3) if ms else None,
        p99_by_second={k: round(pct(v, 99), 3) for k, v in sorted(per_second.items())},
        stopped_by="stop file" if os.path.exists(stop_file) else "limit",
    )
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
