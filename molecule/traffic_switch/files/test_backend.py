"""TEST FIXTURE (molecule only): a stand-in for one color of sovereign-runtime.

The traffic_switch role does not install the runtime, so the molecule scenario runs this tiny HTTP server
as each color: GET /v2/health/ready answers 200 (or 503 while /run/sovereign-test/<color>.down exists),
POST /v2/models/<name>/infer answers an Open Inference Protocol-shaped JSON naming the color.
Usage: test_backend.py <color> <port>
"""

import http.server
import json
import os
import sys

COLOR = sys.argv[1]
PORT = int(sys.argv[2])
DOWN_FLAG = f"/run/sovereign-test/{COLOR}.down"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v2/health/ready":
            if os.path.exists(DOWN_FLAG):
                self._send(503, {"ready": False, "color": COLOR})
            else:
                self._send(200, {"ready": True, "color": COLOR})
        else:
            self._send(200, {"color": COLOR, "path": self.path})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        parts = self.path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
            self._send(
                200,
                {
                    "model_name": parts[2],
                    "outputs": [{"name": "color", "shape": [1], "datatype": "BYTES", "data": [COLOR]}],
                },
            )
        else:
            self._send(404, {"error": f"no route {self.path}"})


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
