"""Prometheus metrics, cheap to update.

The hot path only bumps plain Python ints and floats (a histogram observation is one ``bisect`` and two
additions, ~0.3 us); prometheus-client turns them into metric families when ``/metrics`` is scraped.
Everything runs on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

PREFIX = "sovereign_runtime_"
# Seconds. Fine between 0.1 ms and 100 ms, where a small model's latency lives, coarser beyond.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075,
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        buckets, acc = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            acc += count
            buckets.append((_fmt(bound), acc))
        buckets.append(("+Inf", acc + self.counts[-1]))
        fam.add_metric(list(labels.values()), buckets, self.total)
        return fam


def _fmt(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """All metrics of one runtime process. ``gauges`` are read at scrape time from the engine."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.request_latency = Histogram(LATENCY_BUCKETS)
        self.queue_latency = Histogram(LATENCY_BUCKETS)
        self.compute_latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.chaos_injected = 0
        self.feature_fetch_latency = Histogram(LATENCY_BUCKETS)
        self.features: Any = None  # features.FeatureSource when the model has a feature service
        self.model_labels: dict[str, str] = {"model": "", "version": "", "color": "", "device": ""}
        self.info: dict[str, str] = {}
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (doc, read)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        model = self.model_labels["model"]
        total = CounterMetricFamily(
            PREFIX + "requests",
            "Requests answered, by endpoint and HTTP status code",
            labels=["model", "endpoint", "code"],
        )
        for (endpoint, code), n in sorted(self.requests.items()):
            total.add_metric([model, endpoint, str(code)], n)
        yield total
        lbl = {"model": model}
        yield self.request_latency.family(
            PREFIX + "request_duration_seconds", "Infer request latency, body read to response ready", lbl
        )
        yield self.queue_latency.family(
            PREFIX + "queue_duration_seconds", "Time an infer request waited for its batch to start", lbl
        )
        yield self.compute_latency.family(
            PREFIX + "compute_duration_seconds", "Model forward time per executed batch (incl. copies)", lbl
        )
        yield self.batch_size.family(PREFIX + "batch_size", "Rows (batch dimension) per model forward", lbl)
        chaos = CounterMetricFamily(PREFIX + "chaos_injected", "Infer requests failed on purpose (chaos knob)")
        chaos.add_metric([], self.chaos_injected)
        yield chaos
        if self.features is not None:
            yield from self._feature_families(lbl)
        info = InfoMetricFamily(PREFIX + "model", "The model this process serves")
        info.add_metric([], {**self.model_labels, **self.info})
        yield info
        yield _gauge(PREFIX + "model_load_seconds", "Seconds to fetch and load the model", self.load_seconds)
        yield _gauge(PREFIX + "warmup_seconds", "Seconds of warm-up and golden check", self.warmup_seconds)
        for name, (doc, read) in self.gauges.items():
            yield _gauge(PREFIX + name, doc, read())

    def _feature_families(self, lbl: dict[str, str]) -> Iterator[Metric]:
        source = self.features
        yield self.feature_fetch_latency.family(
            PREFIX + "feature_fetch_duration_seconds",
            "Time an entity-keyed request waited for its features (its share of a coalesced online-store read)",
            lbl,
        )
        fetches = CounterMetricFamily(
            PREFIX + "feature_fetches",
            "Entity-keyed requests by fetch result: ok, unknown_entity (404), unavailable (503)",
            labels=["model", "feature_service", "result"],
        )
        for result, n in (("ok", source.ok), ("unknown_entity", source.unknown), ("unavailable", source.unavailable)):
            fetches.add_metric([lbl["model"], source.service_name, result], n)
        yield fetches
        reads = CounterMetricFamily(
            PREFIX + "feature_store_reads",
            "Online-store reads attempted: one per group of entity-keyed requests waiting together",
            labels=["model", "feature_service"],
        )
        reads.add_metric([lbl["model"], source.service_name], source.reads)
        yield reads
        up = GaugeMetricFamily(
            PREFIX + "feature_store_up",
            "1 while the last online-store read succeeded (0: entity-keyed requests get 503)",
            labels=["model", "feature_service"],
        )
        up.add_metric([lbl["model"], source.service_name], 1.0 if source.up else 0.0)
        yield up


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
