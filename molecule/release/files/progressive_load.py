"""Keep-alive load that records which arm answered each request (python3 stdlib; a test tool of
molecule/release/tests/test_progressive.py, run by molecule/release).

KEYLESS threads each POST the golden inference of MODEL to URL in turn on one keep-alive HTTP/1.1 connection,
without a sticky key (split by weight). One more thread sends the same request with a sticky key header
(X-Sovereign-Key), cycling through KEYS keys "k-0".."k-<KEYS-1>", on its own keep-alive connection. Each client
waits PACE_S (default 0.01) after each answer: steady load that leaves the 2-core test machine room for the
playbook under test (back to back, 4 clients made ~1,700 requests/s and every Ansible task 3-7 s). Runs until
STOP_FILE exists or MAX_SECONDS. A request fails on any transport error (no retry) or a status other than 200.

Writes one JSON object to OUT (atomically): requests, failures, samples, and the timelines
  keyless: [[wall time, color, model version], ...]   keyed: [[wall time, key, color], ...]

usage: progressive_load.py URL MODEL KEYLESS KEYS MAX_SECONDS STOP_FILE OUT [PACE_S]
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def golden_body(host, port, model):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", f"/v2/models/{model}")
    meta = json.loads(conn.getresponse().read())
    conn.close()
    golden = meta["parameters"]["golden"]
    if isinstance(golden, str):
        if golden.strip().startswith("{"):
            golden = json.loads(golden)
        else:
            with open(golden, encoding="utf-8") as handle:
                golden = json.load(handle)
    return json.dumps({"inputs": golden["inputs"]}).encode()


def main(argv):
    url, model, keyless, keys = argv[1], argv[2], int(argv[3]), int(argv[4])
    max_seconds, stop_file, out = float(argv[5]), argv[6], argv[7]
    pace = float(argv[8]) if len(argv) > 8 else 0.01
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    body = golden_body(host, port, model)
    path = f"/v2/models/{model}/infer"
    lock = threading.Lock()
    state = dict(requests=0, failures=0, samples=[], keyless=[], keyed=[])
    deadline = time.monotonic() + max_seconds
    stop = threading.Event()

    def worker(keyed):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            key = f"k-{n % keys}" if keyed else None
            n += 1
            headers = {"Content-Type": "application/json"}
            if key:
                headers["X-Sovereign-Key"] = key
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                color = resp.getheader("X-Sovereign-Color") or "?"
                version = resp.getheader("X-Sovereign-Model-Version") or "?"
                ok = resp.status == 200
                problem = None if ok else f"{resp.status} from {color}"
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
                ok, color, version, problem = False, "?", "?", f"transport: {exc!r}"
            now = round(time.time(), 3)
            with lock:
                state["requests"] += 1
                if not ok:
                    state["failures"] += 1
                    if len(state["samples"]) < 10:
                        state["samples"].append(problem)
                elif keyed:
                    state["keyed"].append([now, key, color])
                else:
                    state["keyless"].append([now, color, version])
            if pace > 0:
                stop.wait(pace)
        conn.close()

    threads = [threading.Thread(target=worker, args=(False,)) for _n in range(keyless)]
    if keys:
        threads.append(threading.Thread(target=worker, args=(True,)))
    for thread in threads:
        thread.start()
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
