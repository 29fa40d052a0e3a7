"""Lab/test-only Alertmanager webhook receiver: appends every POSTed notification as one JSON line to a file.

Usage: lab_alert_receiver.py HOST PORT FILE. Each line is Alertmanager's webhook payload with `received_at`
added; `GET /` answers 200 (a readiness probe). Not for production: no auth, no TLS, stdlib only.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            payload["received_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(payload, sort_keys=True) + "\n")
            self.send_response(200)
            self.end_headers()

        def log_message(self, fmt, *args):
            sys.stderr.write(fmt % args + "\n")

    ThreadingHTTPServer((host, port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
