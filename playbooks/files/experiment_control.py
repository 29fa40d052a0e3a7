"""Start or end an experiment on one host (playbooks/experiment.yml): write every color's experiment.json at one
instant, with its start (or end) DELAY_S after the host's clock at that instant.

    experiment_control.py started|ends DELAY_S DEFINITION_JSON DIR [DIR ...]

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


def main(argv):
    if len(argv) < 5 or argv[1] not in ("started", "ends"):
        sys.exit("usage: experiment_control.py started|ends DELAY_S DEFINITION_JSON DIR [DIR ...]")
    key, delay, definition, directories = argv[1], float(argv[2]), json.loads(argv[3]), argv[4:]
    now = time.time()
    doc = dict(definition, **{key: round(now + delay, 6)})
    for directory in directories:
        write(directory, doc)
    print(json.dumps({"at": doc[key], "now": now}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
