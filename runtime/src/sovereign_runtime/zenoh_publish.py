"""Publish one message on the Zenoh bus and exit: ``python -m sovereign_runtime.zenoh_publish --config FILE KEY``
with the payload on stdin (the release flow publishes each ledger record on ``sovereign/events/<host>/release``).

Exit 0 once the message is handed to the session (Zenoh pub/sub is fire-and-forget: no subscriber is no error),
2 when no session opens (the reason on stderr, with the router endpoints and user of the configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sovereign_runtime.zenoh_publish", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="Zenoh client configuration (JSON5: routers, credentials)")
    p.add_argument("--linger-s", type=float, default=0.2, help="keep the session this long after the put")
    p.add_argument("key", help="key expression to publish on")
    args = p.parse_args(argv)
    payload = sys.stdin.buffer.read()
    import zenoh

    conf = zenoh.Config.from_file(args.config)
    try:
        session = zenoh.open(conf)
    except Exception as exc:
        endpoints = conf.get_json("connect/endpoints")
        user = json.loads(conf.get_json("transport/auth/usrpwd/user") or "null")
        print(
            f"zenoh_publish: no session to {endpoints} as {user!r}: {exc} (routers down, or wrong user/password)",
            file=sys.stderr,
        )
        return 2
    try:
        session.put(args.key, payload, encoding=zenoh.Encoding.APPLICATION_JSON)
        time.sleep(args.linger_s)
    finally:
        session.close()
    print(json.dumps({"published": args.key, "bytes": len(payload)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
