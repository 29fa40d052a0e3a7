#!/usr/bin/env python3
"""benchmarks/zenoh: inference round trip through the Zenoh router vs HTTP through HAProxy, and the failover gap.

On the molecule zenoh hosts (after `bash /work/mol.sh zenoh converge`, or any converged host reached by
--exec/--router-exec): copies client.py to the inference host and runs, in one run,
  1. p50/p99 at concurrency 1 and 16: `sovereign/infer/<model>` through the routers (a Zenoh querier, client mode,
     the client user) vs POST /v2/models/<model>/infer through the HAProxy frontend; same golden body;
  2. the failover gap: back-to-back queries while the router the runtime is attached to is stopped (4 s) and
     started again: failed queries and the longest time between two answers, in ms.

usage: bench.py [--exec "podman exec -i molecule-zenoh-inf"] [--router-exec "podman exec molecule-zenoh-r{n}"]
                [--seconds 10] [--out FILE]
Client and servers share the machine's cores: the numbers are side by side, not absolute.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import time

HERE = pathlib.Path(__file__).resolve().parent
CONTRACT = "/etc/ansible/facts.d/sovereign.fact"
PY = "/opt/sovereign/runtime/blue/bin/python"


def sh(prefix, command, stdin=None):
    proc = subprocess.run([*shlex.split(prefix), "sh", "-c", command], input=stdin, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{prefix} {command!r} failed ({proc.returncode}): {proc.stderr.strip()[:400]}")
    return proc.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exec", default="podman exec -i molecule-zenoh-inf", help="how to run a command on the host")
    p.add_argument("--router-exec", default="podman exec molecule-zenoh-r{n}", help="... on router n (1, 2)")
    p.add_argument("--user", default="sovereign-client")
    p.add_argument("--password", default="client-test-password-1", help="the client user's (molecule's test value)")
    p.add_argument("--model", default="demo")
    p.add_argument("--golden", default="/var/lib/sovereign/models/demo/model.pt.golden.json")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    contract = json.loads(sh(args.exec, f"cat {CONTRACT}"))
    eps = ",".join(contract["runtime"]["zenoh"]["endpoints"])
    frontend = contract["traffic_switch"]["frontend"]["port"]
    sh(args.exec, "cat > /tmp/zenoh-bench-client.py", stdin=(HERE / "client.py").read_text())
    golden = json.loads(sh(args.exec, f"cat {args.golden}"))
    sh(args.exec, "cat > /tmp/zenoh-bench-body.json", stdin=json.dumps({"inputs": golden["inputs"]}))
    common = (
        f"{PY} /tmp/zenoh-bench-client.py {{}} --endpoints {eps} --user {shlex.quote(args.user)} "
        f"--password {shlex.quote(args.password)} --key sovereign/infer/{args.model} --body /tmp/zenoh-bench-body.json"
    )
    latency = json.loads(
        sh(
            args.exec,
            common.format("latency") + f" --seconds {args.seconds} "
            f"--http http://127.0.0.1:{frontend}/v2/models/{args.model}/infer",
        )
        .strip()
        .splitlines()[-1]
    )
    # Failover: stop each router in turn under load (one of them carries the runtime's session).
    failover = {}
    for n in (1, 2):
        load = subprocess.Popen(
            [*shlex.split(args.exec), "sh", "-c", common.format("load") + " --seconds 10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        router = args.router_exec.format(n=n)
        sh(router, "systemctl stop sovereign-zenoh-router")
        time.sleep(4)
        sh(router, "systemctl start sovereign-zenoh-router")
        out, _ = load.communicate(timeout=60)
        failover[f"r{n}_stopped"] = json.loads(out.strip().splitlines()[-1])
        time.sleep(5)  # let it rejoin before the next
    result = {"latency": latency, "failover": failover}
    print(f"{'path':10} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for key, row in latency.items():
        name, c = key.split("_c")
        print(f"{name:10} {c:>3} {row['rps']:>8} {row['p50_ms']!s:>8} {row['p99_ms']!s:>8} {row['errors']:>6}")
    for c in ("1", "16"):
        z, h = latency[f"zenoh_c{c}"], latency[f"http_c{c}"]
        print(f"c={c}: zenoh/http p50 {z['p50_ms'] / h['p50_ms']:.2f}x, p99 {z['p99_ms'] / h['p99_ms']:.2f}x")
    for key, row in failover.items():
        print(f"failover {key}: {row['ok']} answered, {row['failed']} failed, longest gap {row['max_gap_ms']} ms")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
