"""Prometheus metrics: request counters kept here, engine and job figures read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from vggt_cache.service.runtime import ServiceRuntime


class _RuntimeCollector:
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        ready = GaugeMetricFamily("vggt_cache_ready", "1 when the model is loaded and serving")
        ready.add_metric([], 1.0 if self.runtime.components is not None else 0.0)
        yield ready
        c = self.runtime.components
        if c is None:
            return
        stats = c.engine.stats()
        queued = GaugeMetricFamily("vggt_cache_queued_units", "units waiting for the device", labels=["priority"])
        for priority, n in stats.get("queued", {}).items():
            queued.add_metric([priority], float(n))
        yield queued
        rate = GaugeMetricFamily("vggt_cache_images_per_second", "recent device throughput")
        rate.add_metric([], float(stats.get("images_per_s", 0.0)))
        yield rate
        jobs = GaugeMetricFamily("vggt_cache_jobs", "jobs by state", labels=["state"])
        for state, n in c.jobs.store.count_by_state().items():
            jobs.add_metric([state.value], float(n))
        yield jobs


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, runtime: ServiceRuntime) -> None:
        self._started = time.monotonic()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vggt_cache_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vggt_cache_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.entries = Counter(
            "vggt_cache_feature_entries", "entries served by /features", ["status"], registry=self.registry
        )
        self.registry.register(_RuntimeCollector(runtime))

    def uptime(self) -> float:
        return time.monotonic() - self._started

    async def observe_request(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        self.requests.labels(name, str(response.status_code)).inc()
        self.latency.labels(name).observe(time.perf_counter() - t0)
        return response

    def count_entries(self, entries: Iterable) -> None:
        for e in entries:
            self.entries.labels(e.status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
