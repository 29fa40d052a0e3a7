#!/usr/bin/env python3
"""An A/B test between two registered versions of one model: a short front end to playbooks/experiment.yml.

    scripts/ab_test.py -i inventories/mysite --model churn --model-a 3 --model-b 4 [--split 50] [--duration 1d]
        [--min-samples 5000] [--name churn-3-4] [--tracking-uri http://mlflow:5000] [--print]
    scripts/ab_test.py -i inventories/mysite --stop        # end the experiment a killed run left (docs/adr/1422)

Arm A (usually the version on the live color) and arm B (the challenger, warm on the idle color: deploy.yml -e
color=IDLE, then rollback.yml) may also be given as models:/NAME/VERSION. The duration is at most one week (a longer
test mixes weeks of different traffic and keeps a deploy lock that long); 90m, 12h, 3d or seconds. --print shows the
ansible-playbook command instead of running it. The report: docs/runbooks/experiment-report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "playbooks" / "experiment.yml"
WEEK_S = 7 * 24 * 3600
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": WEEK_S}


def duration(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 3d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= WEEK_S:
        raise argparse.ArgumentTypeError(f"{text!r}: an A/B test runs for more than 0 s and at most one week (7d)")
    return seconds


def model_uri(model: str | None, arm: str, name: str) -> str:
    if arm.startswith("models:/"):
        return arm
    if not model:
        raise SystemExit(f"ab_test.py: --{name} {arm!r} is a bare version: give --model NAME (or models:/NAME/VERSION)")
    return f"models:/{model}/{arm.removeprefix('v')}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ab_test.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--inventory", required=True, help="the Ansible inventory (inventories/mysite)")
    p.add_argument("--model", help="the registered model's name (with bare versions in --model-a/--model-b)")
    p.add_argument("--model-a", help="arm A: a version (3 or v3) or models:/NAME/VERSION")
    p.add_argument("--model-b", help="arm B, the challenger")
    p.add_argument("--split", type=int, default=50, help="percent of requests to arm B (1-99, default 50)")
    p.add_argument("--duration", type=duration, default=86400, help="at most 7d (default 1d)")
    p.add_argument("--min-samples", type=int, default=0, help="end early once every arm has this many per host")
    p.add_argument("--name", help="the experiment's name (default MODEL-A-B)")
    p.add_argument("--tracking-uri", default="", help="MLflow: each arm must be a registered version there")
    p.add_argument("--stop", action="store_true", help="end the experiment a killed run left, instead")
    p.add_argument("--print", dest="show", action="store_true", help="print the command instead of running it")
    return p


def command(args: argparse.Namespace) -> list[str]:
    playbook = shutil.which("ansible-playbook") or "ansible-playbook"
    if args.stop:
        extra = {"experiment_action": "stop"}
    else:
        if not (args.model_a and args.model_b):
            raise SystemExit("ab_test.py: --model-a and --model-b are both needed (or --stop)")
        a, b = model_uri(args.model, args.model_a, "model-a"), model_uri(args.model, args.model_b, "model-b")
        name = args.name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{a.split('/')[1]}-{a.split('/')[2]}-{b.split('/')[2]}")
        extra = {
            "experiment_name": name[:64],
            "experiment_model_a": a,
            "experiment_model_b": b,
            "experiment_split": args.split,
            "experiment_duration_s": args.duration,
            "experiment_min_samples": args.min_samples,
            "experiment_tracking_uri": args.tracking_uri,
        }
    return [playbook, "-i", args.inventory, str(PLAYBOOK), "-e", json.dumps(extra)]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cmd = command(args)
    if args.show:
        print(shlex.join(cmd))
        return 0
    os.execvp(cmd[0], cmd)  # the playbook checks everything else (split, versions, hosts) before it changes anything
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
