#!/usr/bin/env python3
"""benchmarks/switch: what a blue/green switch costs under load, on one real host.

Prints (and writes as JSON with --out):
  1. failed requests across N consecutive blue<->green switches (sovereign.mlops.blue_green_switch) under
     keep-alive load through the frontend (:8000 unless the host contract fact says otherwise);
  2. p99 through the frontend during those switches vs steady p99 (same load, no switching);
  3. playbooks/rollback.yml wall time on a warm host (ansible-playbook start included);
  4. time from a degraded green taking traffic to traffic back on blue (deploy.yml with the runtime's test-only
     chaos latency knob; dominated by deploy_watch_seconds, given).

The host must be a converged inference host with both colors ready (molecule/release after `molecule converge`
is one: `--exec "podman exec molecule-release"`, the default). Needs the load generator at
/usr/local/lib/sovereign-loadgen.py on the host (molecule/release/files/loadgen.py; the converge copies it).

usage: bench.py -i INVENTORY --host NAME [--exec "podman exec molecule-release"] [--switches 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ops"))
from sovereign_ops import probe  # noqa: E402 (the checkout's CLI package: one reader of the host contract)

LOADGEN = "/usr/local/lib/sovereign-loadgen.py"
MODELS = "/var/lib/sovereign/models"


class Host:
    def __init__(self, prefix):
        self.prefix = shlex.split(prefix)
        self.paths = None

    def sh(self, command, check=True):
        # ssh joins its arguments into one string for the remote shell; podman exec passes them as they are.
        argv = ["sh", "-c", command]
        if os.path.basename(self.prefix[0]) == "ssh":
            argv = [shlex.join(argv)]
        proc = subprocess.run([*self.prefix, *argv], capture_output=True, text=True, check=False)
        if check and proc.returncode:
            raise RuntimeError(f"{command}: rc {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def read_contract(self):
        """Ports and paths from the host contract fact, as sovereign-ops reads them; the roles' defaults only
        when the host has no fact, and then it says so."""
        text = self.sh(f"cat {probe.FACT} 2>/dev/null || true")
        fact = json.loads(text) if text.strip() else None
        self.paths = probe.resolve(fact)
        if self.paths["defaulted"]:
            print(
                f"host contract: {', '.join(self.paths['defaulted'])} not in {probe.FACT}; defaults used",
                file=sys.stderr,
            )
        return self.paths

    def frontend(self):
        return f"http://127.0.0.1:{self.paths['frontend_port']}"

    def live(self):
        return probe.map_value(self.sh(f"cat {shlex.quote(self.paths['map_file'])}"), self.paths["map_key"])

    def start_load(self, name, seconds, model, threads=4):
        self.sh(f"rm -f /tmp/{name}.json /tmp/{name}.stop; systemctl reset-failed bench-{name} 2>/dev/null; true")
        self.sh(
            f"systemd-run --unit bench-{name} --collect /usr/bin/python3 {LOADGEN} {self.frontend()} {model} "
            f"{threads} 1 10000000 {seconds} /tmp/{name}.stop /tmp/{name}.json"
        )

    def stop_load(self, name, timeout=120):
        self.sh(f"touch /tmp/{name}.stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.sh(f"cat /tmp/{name}.json 2>/dev/null || true")
            if out.strip():
                return json.loads(out)
            time.sleep(0.5)
        raise RuntimeError(f"load generator {name} did not finish")


def playbook(args, path, extra, check=False):
    exe = shutil.which("ansible-playbook") or str(pathlib.Path(sys.executable).with_name("ansible-playbook"))
    cmd = [
        exe,
        "-i",
        args.inventory,
        "-l",
        args.host,
        str(path),
        "-e",
        json.dumps(extra),
        *(["--check"] if check else []),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode and not extra.get("_expect_failure"):
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise RuntimeError(f"{path.name} failed (rc {proc.returncode})")
    return wall, proc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--host", required=True, help="inventory name of the host")
    parser.add_argument("--exec", default="podman exec molecule-release", help="command prefix to run on the host")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--steady-seconds", type=float, default=20)
    parser.add_argument("--watch-seconds", type=float, default=5)
    parser.add_argument("--model", default="demo", help="served model name the load generator calls")
    parser.add_argument(
        "--no-setup",
        action="store_true",
        help="use the models both colors already serve (both must be ready); skips the degraded-green measure, "
        "which deploys molecule/release's test models",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
    host = Host(args.exec)
    host.read_contract()
    fast = {"deploy_smoke_max_p99_ms": 1000, "deploy_watch_seconds": 5, "deploy_watch_max_p99_ms": 1000}

    # Both colors must be ready with a real model: (re)deploy v2 into the idle color, then roll back, so blue
    # (v1) is live and green (v2) is a warm standby.
    if args.no_setup:
        urls = " ".join(f"http://{c['host']}:{c['port']}/v2/health/ready" for c in host.paths["colors"].values())
        ready = host.sh(f"for u in {urls}; do curl -s -o /dev/null -w '%{{http_code}} ' $u; done")
        if ready.split() != ["200", "200"]:
            raise RuntimeError(f"--no-setup needs both colors ready; /v2/health/ready answered {ready.strip()}")
    else:
        if host.live() != "blue":
            playbook(args, ROOT / "playbooks" / "rollback.yml", {"rollback_to": "blue"})
        wall, _ = playbook(
            args,
            ROOT / "playbooks" / "deploy.yml",
            {"color": "green", "model": f"{MODELS}/v2/model.pt", "model_version": "2", **fast},
        )
        print(f"setup deploy.yml (green v2): {wall:.1f}s", file=sys.stderr)
        playbook(args, ROOT / "playbooks" / "rollback.yml", {})

    results = {}
    # 2a. steady p99
    host.start_load("steady", args.steady_seconds + 60, args.model)
    time.sleep(args.steady_seconds)
    steady = host.stop_load("steady")
    switches = {"bench_host": args.host, "bench_switches": args.switches}
    # 2c. control: the same playbook in check mode (every step of the module up to the flip: state, both health
    # checks), so what Ansible and the module cost on cores shared with the load is told apart from the flip.
    host.start_load("control", 600, args.model)
    time.sleep(2)
    playbook(
        args, ROOT / "benchmarks" / "switch" / "switches.yml", {**switches, "bench_start": host.live()}, check=True
    )
    control = host.stop_load("control")
    # 1 + 2b. switches under load
    host.start_load("switching", 600, args.model)
    time.sleep(2)
    start = time.monotonic()
    playbook(args, ROOT / "benchmarks" / "switch" / "switches.yml", {**switches, "bench_start": host.live()})
    switch_wall = time.monotonic() - start
    switching = host.stop_load("switching")
    results["switches"] = dict(
        count=args.switches,
        seconds=round(switch_wall, 1),
        requests=switching["requests"],
        failed=switching["failures"],
        by_color=switching["by_color"],
        errors=switching["error_samples"],
    )
    results["p99_ms"] = dict(
        steady=steady["p99_ms"],
        during_switches=switching["p99_ms"],
        during_check_mode=control["p99_ms"],
        ratio=round(switching["p99_ms"] / steady["p99_ms"], 2),
        ratio_check_mode=round(control["p99_ms"] / steady["p99_ms"], 2),
        steady_p50=steady["p50_ms"],
        switching_p50=switching["p50_ms"],
        steady_rps=steady["rps"],
        switching_rps=switching["rps"],
    )
    # 3. rollback wall time (warm), both directions measured, under no load.
    if host.live() == "blue":
        playbook(args, ROOT / "playbooks" / "rollback.yml", {"rollback_to": "green"})
    walls = []
    for target in ("blue", "green", "blue"):
        wall, _ = playbook(args, ROOT / "playbooks" / "rollback.yml", {"rollback_to": target})
        walls.append(round(wall, 2))
    results["rollback_wall_s"] = walls
    if args.no_setup:
        return report(results, args)
    # 4. degraded green -> traffic back on blue (a probe on the host records the color every 50 ms).
    host.sh("rm -f /tmp/probe.log")
    host.sh(
        "systemd-run --unit bench-probe --collect /bin/sh -c 'while true; do "
        f"c=$(curl -s -o /dev/null -D - --max-time 2 {host.frontend()}/v2/health/ready | "
        'tr -d "\\r" | awk -F": " "tolower(\\$1)==\\"x-sovereign-color\\" {print \\$2}"); '
        "echo $(date +%s.%N) $c >> /tmp/probe.log; sleep 0.05; done'"
    )
    wall, proc = playbook(
        args,
        ROOT / "playbooks" / "deploy.yml",
        {
            "color": "green",
            "model": f"{MODELS}/v2/model.pt",
            "model_version": "2",
            "deploy_model_extra_env": {"SOVEREIGN_RUNTIME_CHAOS_LATENCY_MS": 150},
            "deploy_smoke_requests": 5,
            "deploy_smoke_max_p99_ms": 5000,
            "deploy_watch_seconds": args.watch_seconds,
            "deploy_watch_max_p99_ms": 100,
            "_expect_failure": True,
        },
    )
    host.sh("systemctl stop bench-probe", check=False)
    samples = [line.split() for line in host.sh("cat /tmp/probe.log").splitlines() if len(line.split()) == 2]
    first_green = next((float(t) for t, c in samples if c == "green"), None)
    back_blue = next((float(t) for t, c in samples if c == "blue" and first_green and float(t) > first_green), None)
    results["degraded_to_blue_s"] = dict(
        seconds=round(back_blue - first_green, 2) if first_green and back_blue else None,
        watch_seconds=args.watch_seconds,
        deploy_rc=proc.returncode,
    )
    # Leave green healthy again.
    playbook(
        args,
        ROOT / "playbooks" / "deploy.yml",
        {"color": "green", "model": f"{MODELS}/v2/model.pt", "model_version": "2", **fast},
    )
    playbook(args, ROOT / "playbooks" / "rollback.yml", {})
    return report(results, args)


def report(results, args):
    print(json.dumps(results, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
