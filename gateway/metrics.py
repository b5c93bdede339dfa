"""Prometheus metrics of the gateway, in a registry of its own so that several apps can live in one process.

Besides its HTTP counters the gateway exports, at each scrape, the backlog of every lane and the live
workers per model, read from Redis: these exist while no worker runs, so autoscaling can wake workers
from zero and the no-worker alert can fire (docs/metrics.md).

Several gateway processes on one port (TOKENQ_GATEWAY_WORKERS) share their counters through
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by gateway/server.py): a scrape that
lands on any of them reads the sum of all, so totals never go back between scrapes. The backlog is read
from Redis at the scrape, so it is never one process's share."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access_log import CLIENT_CLOSED
from gateway.backlog import StreamBacklog, lanes, read_backlog
from gateway.flight import TtlCache
from gateway.metrics_peers import PeerMetrics
from gateway.redis_client import PROBE_TIMEOUT_S
from jobstore import JobRef
from jobstore.memory import RedisMemory, read_memory
from protocol.jobs import JobState

# No `*_created` series beside each counter and histogram (as vLLM): they doubled the series and nothing reads them.
disable_created_metrics()

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: set, every metric lives in files there
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
        # Jobs the gateway itself moved to their final state (reason: `cancelled`, `expired`), which no worker
        # counts: jobstore's scripts tell which call ended a job, so each counts once over every gateway.
        self.jobs_ended = Counter("tokenq_gateway_jobs_ended", "jobs the gateway ended itself (a queued job "
                                  "cancelled, a job past its deadline)", ["model", "reason"], registry=self.registry)
        # The response caches call these on each lookup: kind is "exact" or "semantic".
        self.cache_lookups = Counter("tokenq_gateway_cache_lookups", "response-cache lookups by kind",
                                     ["kind"], registry=self.registry)
        self.cache_hits = Counter("tokenq_gateway_cache_hits", "response-cache hits by kind (answered without "
                                  "queueing)", ["kind"], registry=self.registry)
        # Each process has its own index: with several, the least-filled one, and 1 while any still loads.
        self.semantic_entries = Gauge("tokenq_gateway_semantic_index_entries", "semantic entries in this "
                                      "gateway's vector index", registry=self.registry, multiprocess_mode="livemin")
        self.semantic_loading = Gauge("tokenq_gateway_semantic_index_loading", "1 while this gateway's vector "
                                      "index loads the entries Redis held at its start", registry=self.registry,
                                      multiprocess_mode="livemax")
        self.backlog = BacklogCollector()
        self.registry.register(self.backlog)
        self._backlog_cache = TtlCache(max_entries=1)
        self._lanes_cache = TtlCache(max_entries=1)

    def job_ended(self, ref: JobRef, state: JobState) -> None:
        """The job store's `on_ended`: one job the gateway ended."""
        self.jobs_ended.labels(ref.model, state.value).inc()

    async def observe_backlog(self, redis, registry) -> None:
        """Set the lane and worker gauges from Redis (at most once per BACKLOG_CACHE_S)."""
        await self._backlog_cache.get("backlog", lambda: self._read_backlog(redis, registry), BACKLOG_CACHE_S)

    async def _read_backlog(self, redis, registry) -> bool:
        now = time.time()
        known = await self._lanes_cache.get("lanes", lambda: lanes(redis), LANES_CACHE_S)
        workers = await registry.live_workers()
        rows = await read_backlog(redis, now, known, live={w.worker_id for w in workers})
        models = {m for m, _ in known} | {w.model for w in workers}
        self.backlog.memory = await read_memory(redis)
        self.backlog.rows = rows
        self.backlog.live_workers = {model: sum(w.model == model for w in workers) for model in sorted(models)}
        return True

    async def scrape(self, redis, registry) -> Response:
        """The /metrics answer: this gateway's metrics, the backlog, and those of the peers named in
        TOKENQ_METRICS_PEERS (how one scrape of `tokenq up` shows every role)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.observe_backlog(redis, registry)
        except Exception:  # noqa: BLE001 - Redis away or silent: the HTTP metrics still answer, the gauges as they were
            pass
        body = self._own() + await self.peers.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def render(self) -> Response:
        return Response(self._own(), media_type=CONTENT_TYPE_LATEST)

    def _own(self) -> bytes:
        if not os.environ.get(MULTIPROC_DIR_ENV):
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_process)
        every_process.register(self.backlog)
        return generate_latest(every_process)


def mark_process_gone() -> None:
    """At a gateway process's shutdown in multiprocess mode: its gauges leave the live ones."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        multiprocess.mark_process_dead(os.getpid())


class BacklogCollector:
    """The lanes' backlog, the live workers and Redis's memory as the last read from Redis left them: series
    of a lane or a model that is gone go with the next read."""

    def __init__(self) -> None:
        self.rows: list[StreamBacklog] = []
        self.live_workers: dict[str, int] = {}
        self.memory: RedisMemory | None = None  # None until read, or where INFO is refused

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "lane", "tenant"]
        families = [
            (GaugeMetricFamily("tokenq_queue_waiting_jobs", "jobs no live worker holds: not taken yet, or held "
                               "by a worker whose heartbeat is gone", labels=labels), "waiting"),
            (GaugeMetricFamily("tokenq_queue_running_jobs", "jobs a live worker has taken and not yet finished",
                               labels=labels), "running"),
            (GaugeMetricFamily("tokenq_queue_oldest_waiting_seconds", "age of the oldest waiting job (0 if none)",
                               labels=labels), "oldest_waiting_s"),
        ]
        for family, field in families:
            for r in self.rows:
                family.add_metric([r.model, r.lane, r.tenant], getattr(r, field))
            yield family
        workers = GaugeMetricFamily("tokenq_live_workers", "workers whose heartbeat is current, by model "
                                    "(0 for a model with queued jobs and no worker)", labels=["model"])
        for model, count in self.live_workers.items():
            workers.add_metric([model], count)
        yield workers
        if (memory := self.memory) is not None:  # read again at each scrape: a CONFIG SET shows at once
            yield GaugeMetricFamily("tokenq_redis_used_memory_bytes", "Redis's used_memory (its fullest node)",
                                    value=memory.used_memory)
            yield GaugeMetricFamily("tokenq_redis_maxmemory_bytes", "Redis's maxmemory (0: no limit)",
                                    value=memory.maxmemory)
            evicts = GaugeMetricFamily("tokenq_redis_evicts", "1 when Redis's maxmemory-policy drops keys when full "
                                       "(a job's among them, without an error); tokenq wants noeviction",
                                       labels=["policy"])
            evicts.add_metric([memory.maxmemory_policy], 1 if memory.evicts else 0)
            yield evicts


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
        status = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope)
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
            await send(message)

        returned = False
        try:
            await self.app(scope, receive, send_wrapper)
            returned = True
        finally:
            if status is None:  # unanswered: the client left first if the app returned, else the server failed
                status = CLIENT_CLOSED if returned else 500
            self.metrics.requests.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
