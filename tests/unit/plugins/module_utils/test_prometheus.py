# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""plugins/module_utils/_prometheus.py against a real Prometheus process (Debian's prometheus 2.42 from make
bootstrap) scraping a runtime-shaped /metrics page every 0.5 s (prometheus_fixture.py); skipped, saying so, where
the binary is missing. Plus tables for the PromQL it builds."""

from __future__ import annotations

import io
import time
import urllib.parse

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _prometheus
from ansible_collections.sovereign.mlops.tests.unit.plugins.module_utils.prometheus_fixture import (
    PrometheusProcess,
    RuntimeMetrics,
    drive,
    free_port,
    needs_prometheus,
)


def test_selector_escapes_and_sorts():
    assert _prometheus.selector(host='a"b', color="green", regex={"code": "5.."}) == (
        '{code=~"5..",color="green",host="a\\"b"}'
    )


def test_window_queries_are_the_alerts_expressions_over_the_window():
    q = _prometheus.window_queries("inf-01", "green", 29.2)
    assert q["requests"] == (
        'sum(increase(sovereign_runtime_requests_total{color="green",endpoint="infer",host="inf-01",'
        'job="sovereign_runtime"}[30s]))'
    )
    assert 'code=~"5.."' in q["errors"] and q["errors"].endswith("or vector(0)")
    assert q["p99"].startswith("histogram_quantile(0.99, sum by (le) (increase(sovereign_runtime_request_duration")


def test_unreachable_prometheus_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(_prometheus.PrometheusError, match=f"cannot reach Prometheus at {url}"):
        _prometheus.query(url, "up", timeout=1)


@pytest.fixture(scope="module")
def prometheus():
    green, blue = RuntimeMetrics(), RuntimeMetrics()
    prom = PrometheusProcess(
        {
            f"127.0.0.1:{green.port}": {"host": "inf-01", "color": "green"},
            f"127.0.0.1:{blue.port}": {"host": "inf-01", "color": "blue"},
        }
    )
    try:
        prom.wait_targets_up(2)
        # green: 100 requests a second, 2 of them 503 (1.96 %), 2 % between 50 and 75 ms; blue: no traffic.
        drive(green, 4.0, ok=98, errors=2, slow_per_100=2)
        # The window ends where the traffic did, however late a loaded machine runs the tests; the sleep lets the
        # scrapes of that last second land (every 0.5 s).
        prom.driven_until = time.time()
        time.sleep(1.0)
        yield prom
    finally:
        prom.close()
        green.close()
        blue.close()


@needs_prometheus
def test_color_window_reads_the_real_figures(prometheus):
    out = _prometheus.color_window(prometheus.url, "inf-01", "green", seconds=3, at=prometheus.driven_until)
    assert 200 <= out["requests"] <= 400, out
    assert out["error_ratio"] == pytest.approx(0.02, abs=0.002), out
    # 98 % within 50 ms, 2 % in (50, 75]: p99 interpolated halfway into that bucket.
    assert 55 <= out["p99_ms"] <= 70, out
    assert set(out["queries"]) == {"requests", "errors", "p99"}


@needs_prometheus
def test_a_color_without_traffic_has_no_figures(prometheus):
    out = _prometheus.color_window(prometheus.url, "inf-01", "blue", seconds=3, at=prometheus.driven_until)
    assert (out["requests"], out["error_ratio"], out["p99_ms"]) == (None, None, None)


@needs_prometheus
def test_an_unknown_host_has_no_figures(prometheus):
    assert _prometheus.color_window(prometheus.url, "inf-09", "green", seconds=3)["requests"] is None


@needs_prometheus
def test_a_query_prometheus_refuses_names_the_error(prometheus):
    with pytest.raises(_prometheus.PrometheusError, match=r"HTTP 400 .*bad_data"):
        _prometheus.query(prometheus.url, "sum(")


@needs_prometheus
def test_several_series_for_a_scalar_is_an_error(prometheus):
    with pytest.raises(_prometheus.PrometheusError, match="returned 2 series"):
        _prometheus.scalar(prometheus.url, 'up{job="sovereign_runtime"}')


def test_color_window_asks_all_its_queries_at_one_instant():
    """Without ``at``, the three queries still share one evaluation time: two windows that slid between the
    requests and errors queries gave a wrong ratio under load."""
    seen = []

    def opener(url, timeout):
        seen.append(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("time"))
        time.sleep(0.01)
        return io.BytesIO(b'{"status":"success","data":{"resultType":"vector","result":[{"value":[0,"7"]}]}}')

    out = _prometheus.color_window("http://prom:9090", "inf-01", "green", seconds=30, opener=opener)
    assert out["requests"] == 7 and len(seen) == 3
    assert seen[0] is not None and seen[0] == seen[1] == seen[2]
