"""Prometheus metrics (prometheus-client): requests, latency, upstream trouble, limits, streams, tokens.

Labels stay bounded: route (the endpoint, not the path), model (a catalog id), provider, status; never
a client IP or a key. With several workers, every worker's samples are merged at scrape time, through
files in PROMETHEUS_MULTIPROC_DIR (`shared_samples` makes one when it is not set).

A request only adds to plain counters (a prometheus-client update takes locks and a dozen calls);
they are moved into the metrics at each scrape, and every second when workers share the samples.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import os
import tempfile
import collections
from typing import TYPE_CHECKING, Any, AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.errors import GatewayError

if TYPE_CHECKING:
    from proxy.outcome import Outcome

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def shared_samples() -> str | None:
    """Makes every worker's samples land in files that any worker's scrape merges: prometheus-client's
    multi-process mode, in PROMETHEUS_MULTIPROC_DIR or a new private directory. Called by the
    supervisor before any metric exists; returns the directory it made, for it to remove at exit."""
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = tempfile.mkdtemp(prefix="turnstile-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    values.ValueClass = values.get_value_class()  # chosen when prometheus-client was imported
    return made


class Metrics:
    def __init__(self, token: str = "") -> None:
        self.token = token
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("turnstile_requests_total", "Requests answered", ["route", "model", "provider", "status"], registry=r)
        self.ttfb = Histogram("turnstile_time_to_first_byte_seconds", "Time to the first body byte of a relayed answer",
                              ["route"], buckets=_BUCKETS, registry=r)
        self.duration = Histogram("turnstile_request_duration_seconds", "Time to the end of the answer", ["route"],
                                  buckets=_BUCKETS, registry=r)
        self.upstream_errors = Counter("turnstile_upstream_errors_total", "Upstream failures answered with 5xx",
                                       ["provider", "status"], registry=r)
        self.retries = Counter("turnstile_upstream_retries_total", "Upstream retries", ["provider"], registry=r)
        self.fallbacks = Counter("turnstile_fallbacks_total", "Requests that fell back to another model", ["model"], registry=r)
        self.rejections = Counter("turnstile_rejections_total", "Requests refused by the gateway, by error type",
                                  ["error_type"], registry=r)
        self.streams = Gauge("turnstile_streams_in_flight", "Streams being relayed", registry=r, multiprocess_mode="livesum")
        self.tokens = Counter("turnstile_tokens_total", "Tokens from upstream usage", ["model", "direction"], registry=r)
        self.storage_up = Gauge("turnstile_rate_limit_storage_up", "1 while the shared rate-limit storage answers",
                                registry=r, multiprocess_mode="livemin")
        self.storage_outages = Counter("turnstile_rate_limit_storage_outages_total",
                                       "Times the shared rate-limit storage stopped answering", registry=r)
        self.unchecked = Counter("turnstile_rate_limit_unchecked_total",
                                 "Requests let through unchecked while the rate-limit storage was down (fail_open)",
                                 registry=r)
        self.limits: Any = None  # the shared rate-limit storage (proxy.limitstore.SharedStorage), if any
        self._limits_seen = (0, 0)
        self.multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Children by label values, looked up once: `labels()` validates and locks on every call.
        self._children: dict[tuple[Any, ...], Any] = {}
        # Not yet moved into the metrics: request counts by labels, histogram bucket counts and sums.
        self._requests: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self._tokens: collections.Counter[tuple[str, str]] = collections.Counter()
        self._observed: dict[tuple[Any, str], list[float]] = {}  # counts per bucket (+Inf last), then the sum
        self.streams_in_flight = 0

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _observe(self, metric: Any, route: str, seconds: float) -> None:
        counts = self._observed.get((metric, route))
        if counts is None:
            counts = self._observed[(metric, route)] = [0] * (len(_BUCKETS) + 2)
        counts[bisect.bisect_left(_BUCKETS, seconds)] += 1  # Prometheus buckets are `le`: <= bound
        counts[-1] += seconds

    def observe(self, outcome: Outcome, seconds: float, error: GatewayError | None) -> None:
        route, model, provider, status = outcome.route, outcome.model, outcome.provider, outcome.status
        if outcome.first_byte_at:
            self._observe(self.ttfb, route, outcome.first_byte_at - outcome.started_at)
        if outcome.retries:
            self.retries.labels(provider).inc(outcome.retries)
        if outcome.fallbacks:
            self.fallbacks.labels(model).inc()
        if outcome.usage is not None:
            self._tokens[(model, "in")] += outcome.usage.prompt
            self._tokens[(model, "out")] += outcome.usage.completion
        if provider and status >= 500:
            self.upstream_errors.labels(provider, str(status)).inc()
        if error is not None:
            self.rejections.labels(error.error_type).inc()
        self._requests[(route, model, provider, str(status))] += 1
        self._observe(self.duration, route, seconds)

    def sync(self) -> None:
        """Moves what requests counted into the metrics."""
        requests, self._requests = self._requests, collections.Counter()
        for labels, n in requests.items():
            self._child(self.requests, *labels).inc(n)
        tokens, self._tokens = self._tokens, collections.Counter()
        for labels, n in tokens.items():
            self._child(self.tokens, *labels).inc(n)
        observed, self._observed = self._observed, {}
        for (metric, route), counts in observed.items():
            child = self._child(metric, route)
            # prometheus-client keeps a histogram child as one value per bucket and its sum; it has
            # no public call to add many observations at once.
            for bucket, n in zip(child._buckets, counts):
                if n:
                    bucket.inc(n)
            child._sum.inc(counts[-1])
        self.streams.set(self.streams_in_flight)
        if self.limits is not None:
            outages, unchecked = self.limits.outages, self.limits.unchecked
            self.storage_outages.inc(outages - self._limits_seen[0])
            self.unchecked.inc(unchecked - self._limits_seen[1])
            self._limits_seen = (outages, unchecked)
            self.storage_up.set(0 if self.limits.down else 1)

    async def sync_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: with samples shared between workers, every second."""
        task = asyncio.create_task(self._sync_loop()) if self.multiproc else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sync()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sync()

    async def handler(self, request: web.Request) -> web.Response:
        if self.token:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
                raise GatewayError(401, "authentication_required", "The metrics need their bearer token.",
                                   code="authentication_required")
        self.sync()
        registry = self.registry
        if self.multiproc:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
