"""Hold an experiment on one host (playbooks/experiment.yml): poll both arms' GET /v2/experiment until the duration
has passed, or, with a minimum sample size, until every arm has recorded that many requests (the duration is then the
limit). Prints one JSON line: {"reason", "elapsed_s", "arms": {A: {...}, B: {...}}, "unreachable_polls"}.

    experiment_wait.py NAME DURATION_S MIN_SAMPLES POLL_S URL_A URL_B

Exit 1 when an arm stops recording NAME for good (its experiment.json is gone, or the color answers with another
experiment): the play then restores traffic and reports what was recorded. Standard library only (runs on the host).
"""

import json
import sys
import time
import urllib.request


def status(url):
    try:
        with urllib.request.urlopen(url + "/v2/experiment", timeout=5) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def main(argv):
    name, duration, min_samples, poll = argv[1], float(argv[2]), int(argv[3]), float(argv[4])
    urls = {"A": argv[5], "B": argv[6]}
    start = time.monotonic()
    last = {arm: {} for arm in urls}
    unreachable = 0
    wrong = {arm: 0 for arm in urls}
    reason = "duration"
    while True:
        for arm, url in urls.items():
            doc = status(url)
            if doc is None:
                unreachable += 1
                continue
            last[arm] = doc
            wrong[arm] = wrong[arm] + 1 if doc.get("experiment") != name else 0
            if wrong[arm] >= 3:
                out = {"reason": f"arm {arm} ({url}) stopped recording {name}: it records {doc.get('experiment')!r}"}
                print(json.dumps({**out, "elapsed_s": time.monotonic() - start, "arms": last}))
                return 1
        elapsed = time.monotonic() - start
        if min_samples > 0 and all(last[a].get("requests", 0) >= min_samples for a in urls):
            reason = "min_samples"
            break
        if elapsed >= duration:
            break
        time.sleep(min(poll, max(0.0, duration - elapsed)))
    doc = {"reason": reason, "elapsed_s": round(time.monotonic() - start, 1), "arms": last}
    print(json.dumps({**doc, "unreachable_polls": unreachable}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
