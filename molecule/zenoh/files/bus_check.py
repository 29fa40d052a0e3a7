"""Test client of the molecule zenoh scenario (run with the runtime's venv, which has eclipse-zenoh).

  bus_check.py infer   --key K [--payload-file F | --payload TEXT]      one query, replies as JSON
  bus_check.py declare --key K --seconds S                             declare a queryable, wait, report queries
  bus_check.py load    --key K --payload-file F --seconds S            back-to-back queries; failures and the gap

Common: --user, --password, --endpoints (comma-separated). Exit 2 when no session opens, with the reason.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import zenoh


def session(args):
    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    endpoints = [e for e in args.endpoints.split(",") if e]
    conf.insert_json5("connect/endpoints", json.dumps(endpoints))
    conf.insert_json5("connect/timeout_ms", "3000")
    conf.insert_json5("connect/retry", '{"period_init_ms": 100, "period_max_ms": 500, "period_increase_factor": 2}')
    conf.insert_json5("scouting/multicast/enabled", "false")
    if args.user:
        conf.insert_json5("transport/auth/usrpwd/user", json.dumps(args.user))
        conf.insert_json5("transport/auth/usrpwd/password", json.dumps(args.password))
    try:
        return zenoh.open(conf)
    except Exception as exc:
        reachable = []
        for e in endpoints:
            host, _sep, port = e.split("/", 1)[1].rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                reachable.append(e)
            except OSError:
                pass
        if reachable:
            reason = f"session refused by {', '.join(reachable)} for user {args.user!r}: wrong user/password"
        else:
            reason = f"no router reachable at {args.endpoints}"
        print(json.dumps({"error": reason, "zenoh": str(exc)}))
        sys.exit(2)


def payload(args) -> bytes:
    if args.payload_file:
        with open(args.payload_file, "rb") as f:
            return f.read()
    return (args.payload or "").encode()


def replies(s, key, body, timeout):
    out = []
    for r in s.get(key, payload=body, timeout=timeout):
        if r.ok is not None:
            raw = r.ok.payload.to_bytes()
            body = json.loads(raw) if raw[:1] == b"{" else raw.decode()
            out.append({"ok": True, "key": str(r.ok.key_expr), "payload": body})
        else:
            raw = r.err.payload.to_bytes()
            out.append({"ok": False, "payload": json.loads(raw) if raw[:1] == b"{" else raw.decode()})
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["infer", "declare", "load"])
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")
    p.add_argument("--endpoints", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--payload", default="")
    p.add_argument("--payload-file", default="")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--wait-s", type=float, default=0.0, help="infer: retry until a reply or this long")
    args = p.parse_args()
    s = session(args)
    try:
        if args.command == "infer":
            deadline = time.monotonic() + args.wait_s
            started = time.monotonic()
            while True:
                got = replies(s, args.key, payload(args), args.timeout)
                if got or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            print(json.dumps({"replies": got, "waited_s": round(time.monotonic() - started, 3)}))
        elif args.command == "declare":
            seen = []
            q = s.declare_queryable(args.key, lambda query: (seen.append(1), query.reply(args.key, b'{"fake": true}')))
            time.sleep(args.seconds)
            q.undeclare()
            print(json.dumps({"queries_seen": len(seen)}))
        else:
            body = payload(args)
            ok = fail = 0
            last_ok = time.monotonic()
            gap = 0.0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                got = replies(s, args.key, body, args.timeout)
                now = time.monotonic()
                if got and got[0]["ok"]:
                    ok += 1
                    gap = max(gap, now - last_ok)
                    last_ok = now
                else:
                    fail += 1
            print(json.dumps({"ok": ok, "failed": fail, "max_gap_ms": round(gap * 1000, 1)}))
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
