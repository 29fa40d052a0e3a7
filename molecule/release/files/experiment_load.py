"""Experiment traffic with planted outcomes (python3 stdlib; a test tool of
molecule/release/tests/test_progressive_experiment.py, run by molecule/release).

CLIENTS threads POST the golden inference of MODEL to URL (the frontend) on keep-alive connections, each request
with a fresh sticky key (X-Sovereign-Key: <run>-<n>: the split assigns it by hash), read the answer's request id and
model version, and post an outcome for that id to URL/v2/outcomes. The outcome is planted by version: RATES maps a
version to the exact share of its answers whose outcome is 1 (the k-th answer of a version with rate r is 1 when
floor((k+1) r) > floor(k r)), so the planted difference is exact, not sampled. Runs until STOP_FILE exists or
MAX_SECONDS; writes {"requests", "failures", "outcomes", "by_version": {version: [answers, ones]}} to OUT. Each client
waits PACE_S (default 0.01) after each outcome: steady load that leaves the 2-core test machine room for the playbook.

usage: experiment_load.py URL MODEL CLIENTS RATES MAX_SECONDS STOP_FILE OUT [PACE_S]    (RATES e.g. 1=0.2,2=0.5)
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


def main(argv):
    url, model, clients, rates = argv[1], argv[2], int(argv[3]), argv[4]
    max_seconds, stop_file, out = float(argv[5]), argv[6], argv[7]
    pace = float(argv[8]) if len(argv) > 8 else 0.01
    rate = {k: float(v) for k, v in (item.split("=") for item in rates.split(","))}
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", f"/v2/models/{model}")
    golden = json.loads(conn.getresponse().read())["parameters"]["golden"]
    conn.close()
    if isinstance(golden, str):
        with open(golden, encoding="utf-8") as handle:
            golden = json.load(handle)
    body = json.dumps({"inputs": golden["inputs"]}).encode()
    run = os.urandom(4).hex()
    lock = threading.Lock()
    state = {"requests": 0, "failures": 0, "outcomes": 0, "by_version": {}, "errors": []}
    deadline = time.monotonic() + max_seconds
    counter = iter(range(10**9))

    def planted(version):
        with lock:
            k, ones = state["by_version"].setdefault(version, [0, 0])
            r = rate.get(version, 0.0)
            one = math.floor((k + 1) * r) > math.floor(k * r)
            state["by_version"][version] = [k + 1, ones + int(one)]
        return 1 if one else 0

    def worker():
        c = http.client.HTTPConnection(host, port, timeout=10)
        while time.monotonic() < deadline and not os.path.exists(stop_file):
            key = f"{run}-{next(counter)}"
            try:
                headers = {"Content-Type": "application/json", "X-Sovereign-Key": key}
                c.request("POST", f"/v2/models/{model}/infer", body, headers)
                resp = c.getresponse()
                answer = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"infer HTTP {resp.status}: {answer[:200]!r}")
                doc = json.loads(answer)
                outcome = json.dumps({"id": doc["id"], "value": planted(str(doc["model_version"]))}).encode()
                c.request("POST", "/v2/outcomes", outcome, headers)
                resp = c.getresponse()
                text = resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"outcome HTTP {resp.status}: {text[:200]!r}")
                with lock:
                    state["requests"] += 1
                    state["outcomes"] += 1
                if pace > 0:
                    time.sleep(pace)
            except Exception as exc:  # a failed request is counted, the connection renewed
                with lock:
                    state["failures"] += 1
                    if len(state["errors"]) < 5:
                        state["errors"].append(f"{type(exc).__name__}: {exc}")
                c.close()
                c = http.client.HTTPConnection(host, port, timeout=10)
                time.sleep(0.05)
        c.close()

    threads = [threading.Thread(target=worker) for _i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
