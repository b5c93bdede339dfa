"""Prometheus metrics of the gateway, in a registry of its own so that several apps can live in one process.

Besides its HTTP counters the gateway exports, at each scrape, the backlog of every lane and the live
workers per model, read from Redis: these exist while no worker runs, so autoscaling can wake workers
from zero and the no-worker alert can fire (docs/metrics.md)."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.backlog import lanes, read_backlog
from gateway.flight import TtlCache
from gateway.metrics_peers import PeerMetrics

BACKLOG_CACHE_S = 2.0  # several Prometheus servers scraping cost one read
# Finding the lanes SCANs the keyspace, so it is done at most this often: a model's first lane shows up
# in the metrics within that time, and later jobs on it at once.
LANES_CACHE_S = 30.0


class GatewayMetrics:
    def __init__(self, peers: PeerMetrics | None = None) -> None:
        self.registry = CollectorRegistry()
        self.peers = peers if peers is not None else PeerMetrics.from_env()
        self.requests = Counter("tokenq_gateway_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("tokenq_gateway_request_seconds", "time to the response's first byte",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.jobs_enqueued = Counter("tokenq_gateway_jobs_enqueued", "jobs placed on a lane",
                                     ["model", "lane"], registry=self.registry)
        # The response caches call these on each lookup: kind is "exact" or "semantic".
        self.cache_lookups = Counter("tokenq_gateway_cache_lookups", "response-cache lookups by kind",
                                     ["kind"], registry=self.registry)
        self.cache_hits = Counter("tokenq_gateway_cache_hits", "response-cache hits by kind (answered without "
                                  "queueing)", ["kind"], registry=self.registry)
        self.semantic_entries = Gauge("tokenq_gateway_semantic_index_entries", "semantic entries in this "
                                      "gateway's vector index", registry=self.registry)
        self.semantic_loading = Gauge("tokenq_gateway_semantic_index_loading", "1 while this gateway's vector "
                                      "index loads the entries Redis held at its start", registry=self.registry)
        self.waiting = Gauge("tokenq_queue_waiting_jobs", "jobs on a lane that no worker has taken yet",
                             ["model", "lane", "tenant"], registry=self.registry)
        self.running = Gauge("tokenq_queue_running_jobs", "jobs a worker has taken and not yet finished",
                             ["model", "lane", "tenant"], registry=self.registry)
        self.oldest = Gauge("tokenq_queue_oldest_waiting_seconds", "age of the oldest job no worker has taken",
                            ["model", "lane", "tenant"], registry=self.registry)
        self.live_workers = Gauge("tokenq_live_workers", "workers whose heartbeat is current, by model "
                                  "(0 for a model with queued jobs and no worker)", ["model"],
                                  registry=self.registry)
        self._backlog_cache = TtlCache(max_entries=1)
        self._lanes_cache = TtlCache(max_entries=1)

    async def observe_backlog(self, redis, registry) -> None:
        """Set the lane and worker gauges from Redis (at most once per BACKLOG_CACHE_S)."""
        await self._backlog_cache.get("backlog", lambda: self._read_backlog(redis, registry), BACKLOG_CACHE_S)

    async def _read_backlog(self, redis, registry) -> bool:
        now = time.time()
        known = await self._lanes_cache.get("lanes", lambda: lanes(redis), LANES_CACHE_S)
        rows = await read_backlog(redis, now, known)
        workers = await registry.live_workers()
        for gauge in (self.waiting, self.running, self.oldest, self.live_workers):
            gauge.clear()  # a tenant stream or a model that is gone leaves no stale series
        for r in rows:
            self.waiting.labels(r.model, r.lane, r.tenant).set(r.waiting)
            self.running.labels(r.model, r.lane, r.tenant).set(r.running)
            self.oldest.labels(r.model, r.lane, r.tenant).set(r.oldest_waiting_s)
        models = {m for m, _ in known} | {w.model for w in workers}
        for model in models:
            self.live_workers.labels(model).set(sum(w.model == model for w in workers))
        return True

    async def scrape(self, redis, registry) -> Response:
        """The /metrics answer: this gateway's metrics, the backlog, and those of the peers named in
        TOKENQ_METRICS_PEERS (how one scrape of `tokenq up` shows every role)."""
        try:
            await self.observe_backlog(redis, registry)
        except Exception:  # Redis away: the HTTP metrics still answer; the gauges keep their last values
            pass
        body = generate_latest(self.registry) + await self.peers.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP request by its route template (not the raw path, to keep label sets small)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope)
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
