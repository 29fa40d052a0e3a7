# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A real Prometheus (Debian's /usr/bin/prometheus, the package make bootstrap installs for promtool) scraping a
runtime-shaped /metrics page served from a thread, every 0.5 s, with the labels the prometheus role's file_sd gives
runtimes (host, color). The page's counters are driven by :meth:`RuntimeMetrics.serve`."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
needs_prometheus = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(), reason="no prometheus binary (Debian package prometheus: make bootstrap)"
)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1)


class RuntimeMetrics:
    """A /metrics page like the runtime's: infer requests by code and a latency histogram, both counters that
    :meth:`serve` advances, ``ok`` and ``errors`` requests a second, ``slow`` of every 100 over 50 ms."""

    def __init__(self):
        self.port = free_port()
        self.lock = threading.Lock()
        self.counts = {"200": 0.0, "503": 0.0}
        self.buckets = dict.fromkeys(BUCKETS, 0.0)
        self.total = 0.0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = owner.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self):
        with self.lock:
            lines = ["# TYPE sovereign_runtime_requests_total counter"]
            for code, n in self.counts.items():
                lines.append(f'sovereign_runtime_requests_total{{model="m",endpoint="infer",code="{code}"}} {n}')
            lines.append('sovereign_runtime_requests_total{model="m",endpoint="ready",code="503"} 1000')
            lines.append("# TYPE sovereign_runtime_request_duration_seconds histogram")
            for bound, n in self.buckets.items():
                lines.append(f'sovereign_runtime_request_duration_seconds_bucket{{model="m",le="{bound}"}} {n}')
            lines.append(f'sovereign_runtime_request_duration_seconds_bucket{{model="m",le="+Inf"}} {self.total}')
            lines.append(f'sovereign_runtime_request_duration_seconds_count{{model="m"}} {self.total}')
            lines.append(f'sovereign_runtime_request_duration_seconds_sum{{model="m"}} {self.total * 0.004}')
            lines += ["# TYPE sovereign_runtime_ready gauge", "sovereign_runtime_ready 1"]
            lines += ["# TYPE sovereign_runtime_queue_depth gauge", "sovereign_runtime_queue_depth 0"]
        return "\n".join(lines) + "\n"

    def advance(self, ok, errors, slow_per_100):
        """One second of traffic: ok + errors requests, of which slow_per_100 % between 50 and 75 ms, the rest 4 ms."""
        with self.lock:
            self.counts["200"] += ok
            self.counts["503"] += errors
            n = ok + errors
            slow = n * slow_per_100 / 100.0
            for bound in self.buckets:
                self.buckets[bound] += (n - slow) if bound < 0.05 else (n - slow if bound == 0.05 else n)
            self.total += n

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class PrometheusProcess:
    """Prometheus scraping ``targets`` ({"host:port": labels}) every 0.5 s, its TSDB in a temporary directory."""

    def __init__(self, targets):
        self.dir = Path(tempfile.mkdtemp(prefix="sovereign-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "scrape_configs": [
                {
                    "job_name": "sovereign_runtime",
                    "static_configs": [{"targets": [t], "labels": labels} for t, labels in targets.items()],
                }
            ],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        self.log = open(self.dir / "prometheus.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"prometheus did not get ready: {(self.dir / 'prometheus.log').read_text()[-2000:]}")

    def wait_targets_up(self, count, timeout=30):
        """Until ``count`` targets were scraped successfully (Prometheus applies discovered targets every 5 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(self.url + "/api/v1/targets?state=active", timeout=2) as response:
                targets = json.load(response)["data"]["activeTargets"]
            if sum(1 for t in targets if t["health"] == "up") >= count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus scraped fewer than {count} targets up within {timeout}s: {targets}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def drive(metrics, seconds, ok, errors, slow_per_100, step=0.25):
    """Advance ``metrics`` in real time for ``seconds`` at the given rates (per second)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        metrics.advance(ok * step, errors * step, slow_per_100)
        time.sleep(step)
