"""Prometheus metrics of one app (its own registry, so apps in one process do not clash):
requests and latencies per route, predict batches and queue depth, model loads, and job
counts by state (read from the database at each scrape)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.garbage import GarbageTotal
from store.models import JobState

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _JobsCollector(Collector):
    """`dmc_jobs{state=...}`: how many jobs are in each state, counted at scrape time."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self.count = count

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("dmc_jobs", "Jobs by state.", labels=["state"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        try:
            counts = self.count()
        except Exception as exc:
            log.warning("counting jobs for /metrics failed: %s", exc)
            return []
        for state in JobState:
            family.add_metric([state.value], float(counts.get(state.value, 0)))
        return [family]


class _GarbageCollector(Collector):
    """`dmc_garbage_collected_total{kind=...}` and `dmc_garbage_last_run_timestamp_seconds`:
    what the scheduled garbage collection of every worker removed (read from the database
    at scrape time)."""

    def __init__(self, totals: Callable[[], Iterable[GarbageTotal]]) -> None:
        self.totals = totals

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "dmc_garbage_collected",
                "Objects and scratch folders removed by the scheduled garbage collection.",
                labels=["kind"],
            ),
            GaugeMetricFamily(
                "dmc_garbage_last_run_timestamp_seconds",
                "When the garbage collection of each kind last ran (Unix time).",
                labels=["kind"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        collected, last_run = self._families()
        try:
            totals = list(self.totals())
        except Exception as exc:
            log.warning("reading the garbage counts for /metrics failed: %s", exc)
            return []
        for row in totals:
            collected.add_metric([row.kind], float(row.total))
            if row.last_run_at is not None:
                last_run.add_metric([row.kind], row.last_run_at.timestamp())
        return [collected, last_run]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dmc_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "dmc_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dmc_predict_batch_size",
            "Images per forward pass of the model.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "dmc_predict_batch_duration_seconds",
            "Time of one forward pass of the model.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "dmc_predict_queue_depth", "Images waiting for the model.", registry=r
        )
        self.rejected = Counter(
            "dmc_predict_rejected",
            "Predict requests refused with 503 because the queue was full.",
            registry=r,
        )
        self.images = Counter("dmc_predict_images", "Images classified.", registry=r)
        self.model_version = Gauge(
            "dmc_model_version", "The version that answers unpinned requests.", registry=r
        )
        self.model_loads = Counter(
            "dmc_model_loads", "Version loads by outcome.", ["outcome"], registry=r
        )
        self.model_swaps = Counter(
            "dmc_model_swaps", "Times the active version was swapped in.", registry=r
        )

    def watch_jobs(self, count: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_JobsCollector(count))

    def watch_garbage(self, totals: Callable[[], Iterable[GarbageTotal]]) -> None:
        self.registry.register(_GarbageCollector(totals))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (`/jobs/{job_id}`, not the
    concrete path, so the label set stays small)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
