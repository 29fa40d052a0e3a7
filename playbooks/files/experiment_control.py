"""Start or end an experiment on one host (playbooks/experiment.yml): write every color's experiment.json at one
instant, with its start (or end) DELAY_S after the host's clock at that instant.

    experiment_control.py started|ends DELAY_S DEFINITION_JSON DIR [DIR ...]
    experiment_control.py stop DELAY_S - DIR [DIR ...]

``stop`` (playbooks/experiment.yml -e experiment_action=stop, after a killed run) ends whatever experiment each DIR's
experiment.json names, DELAY_S from now, and prints what it found: {"at", "now", "found": {DIR: NAME or null}}.
With ``expire_after_s`` in the definition, ``expires`` = ``started`` + it is written too: past it a runtime records
nothing more even if the file stays (a killed playbook never removes it; docs/adr/1422).

Each runtime reads its DIR/experiment.json every 0.25 s and records the answers between ``started`` and ``ends``
(docs/adr/1420). Written one task per color, the files reached the colors seconds apart on a loaded host, so one arm
started recording before the other (a sample ratio mismatch of the experiment's own making). Here the clock is read
once and every file is written within milliseconds of it (each atomically: a temporary file in DIR, then a rename),
so a DELAY_S of a few seconds lets every color read the file before the instant it names. Prints one JSON line:
{"at": <the instant written>, "now": <the clock read>}. Standard library only (runs on the host).
"""

import json
import os
import sys
import tempfile
import time


def write(directory, doc):
    fd, tmp = tempfile.mkstemp(prefix=".experiment.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, "experiment.json"))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(directory):
    try:
        with open(os.path.join(directory, "experiment.json"), encoding="utf-8") as handle:
            doc = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: the runtime ignores it too; stop removes it all the same
    return doc if isinstance(doc, dict) else {}


def with_expiry(doc):
    try:
        return dict(doc, expires=round(float(doc["started"]) + float(doc["expire_after_s"]), 6))
    except (KeyError, TypeError, ValueError):
        return doc


def main(argv):
    if len(argv) < 5 or argv[1] not in ("started", "ends", "stop"):
        sys.exit(
            "usage: experiment_control.py started|ends DELAY_S DEFINITION_JSON DIR [DIR ...]\n"
            "       experiment_control.py stop DELAY_S - DIR [DIR ...]"
        )
    key, delay, directories = argv[1], float(argv[2]), argv[4:]
    now = time.time()
    at = round(now + delay, 6)
    if key == "stop":
        found = {}
        for directory in directories:
            doc = read(directory)
            found[directory] = doc.get("name") if doc else None
            if doc and doc.get("name"):
                try:
                    ends = min(at, float(doc.get("ends", at)))  # an end already set stays
                except (TypeError, ValueError):
                    ends = at
                write(directory, dict(doc, ends=ends))
        print(json.dumps({"at": at, "now": now, "found": found}))
        return 0
    doc = with_expiry(dict(json.loads(argv[3]), **{key: at}))
    for directory in directories:
        write(directory, doc)
    print(json.dumps({"at": doc[key], "now": now}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
