"""MLflow's Prometheus metrics on a listener of their own, on the host's internal address (docs/adr/1530).

MLflow's workers (`mlflow server --expose-prometheus DIR`) write their counters into DIR
(prometheus_client's multiprocess mode); MLflow serves them at its own /metrics, which with basic-auth on
answers only MLflow's admins (a non-admin user gets 403: MLflow's auth fails closed on routes without a
permission validator). This process reads the same DIR and serves the same series without credentials, so
Prometheus needs neither MLflow's admin password nor any MLflow account, and MLflow's own port keeps every
route behind its auth.

Every scrape first asks MLflow's /health (unauthenticated in MLflow): when MLflow does not answer, the scrape
gets 503, so Prometheus marks the target down (MLflowDown) instead of reading the last counters a dead or hung
server left behind.

Usage: python sovereign_mlflow_metrics.py --listen ADDRESS --port PORT --dir DIR --health-url URL
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="address to listen on (the host's internal address)")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--dir", required=True, help="MLflow's --expose-prometheus directory")
    parser.add_argument("--health-url", required=True, help="MLflow's /health, asked before every scrape")
    parser.add_argument("--health-timeout", type=float, default=3.0, help="seconds (default 3)")
    return parser.parse_args(argv)


class Handler(BaseHTTPRequestHandler):
    server_version = "sovereign-mlflow-metrics"
    args: argparse.Namespace
    # No proxy from the environment: /health is MLflow on this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _mlflow_problem(self) -> str:
        try:
            with self.opener.open(self.args.health_url, timeout=self.args.health_timeout) as resp:
                if resp.status != 200:
                    return f"MLflow {self.args.health_url} answered {resp.status}"
        except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
            return f"MLflow {self.args.health_url}: {exc}"
        if not os.path.isdir(self.args.dir):
            return f"{self.args.dir} does not exist (MLflow runs without --expose-prometheus?)"
        return ""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, b"only /metrics here\n")
            return
        problem = self._mlflow_problem()
        if problem:
            self._answer(503, (problem + "\n").encode())
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.args.dir)
        self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one journal line per scrape would be noise; failures show as the target's lastError."""


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    Handler.args = args
    server_class = type(
        "Server",
        (ThreadingHTTPServer,),
        {"address_family": socket.AF_INET6 if ":" in args.listen else socket.AF_INET, "daemon_threads": True},
    )
    with server_class((args.listen.strip("[]"), args.port), Handler) as httpd:
        httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
