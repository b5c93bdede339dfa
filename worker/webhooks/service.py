"""`tokenq webhooks`: the outbox relay and the arq delivery worker in one process.

arq speaks to one Redis node. On a Redis Cluster the job store stays on the cluster (outboxes, job hashes,
attempts) and arq's delivery queue lives on a single-node Redis of its own, TOKENQ_WEBHOOK_QUEUE_URL.

`WorkerSettings` also lets arq's own CLI run the delivery worker alone
(`arq worker.webhooks.service.WorkerSettings`, with TOKENQ_REDIS_URL set); the relay must then run
somewhere else, e.g. in `tokenq webhooks`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Function, Worker, func

from jobstore.connect import connect, is_cluster_url
from protocol import keys
from protocol.outage import REDIS_DOWN, Outage, once_reachable, waits_out
from tokenq.logs import get_logger
from tokenq.settings import Settings
from worker.webhooks.delivery import CTX_KEY, FUNCTION, Deliverer, deliver_webhook, new_http_client
from worker.webhooks.policy import RetryPolicy
from worker.webhooks.relay import Relay

QUEUE = f"{keys.PREFIX}:webhooks:queue"  # arq's sorted set of delivery jobs
KEEP_RESULT_S = 86400  # while the result is kept, a second enqueue of the same job is a no-op
DRAIN_S = 15.0  # on stop, attempts in flight get this long to finish (then they are run again later)
_log = get_logger("webhooks")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _function(policy: RetryPolicy) -> Function:
    # arq's own try limit only backs up the policy's (which counts recorded attempts); cancelled runs
    # count for arq too, hence the headroom. A slow receiver is cut by the policy's own timeouts.
    return func(deliver_webhook, name=FUNCTION, max_tries=policy.max_attempts + 20,
                timeout=policy.timeout_s * 4 + 10)


async def arq_pool(redis_url: str) -> ArqRedis:
    # No retries of arq's own: the service waits out an unreachable Redis with its back-off (once_reachable).
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = 0
    return await create_pool(settings, job_serializer=_dumps, job_deserializer=json.loads,
                             default_queue_name=QUEUE)


class WebhookService:
    """Relay and delivery worker sharing one Redis; `run` until `stop` is set."""

    def __init__(self, redis_url: str, policy: RetryPolicy | None = None, allow: str | None = None,
                 poll_delay: float = 0.5, block_ms: int = 1000, queue_url: str | None = None) -> None:
        self.redis_url = redis_url
        self.queue_url = queue_url or Settings.from_env().webhook_queue_url or redis_url
        self.policy = policy or RetryPolicy.from_env()
        self.allow = allow
        self.poll_delay = poll_delay
        self.block_ms = block_ms

    async def run(self, stop: asyncio.Event) -> None:
        if is_cluster_url(self.queue_url):  # arq speaks to one Redis node only (docs/redis-cluster.md)
            raise ValueError("arq does not support Redis Cluster: set TOKENQ_WEBHOOK_QUEUE_URL to a single-node "
                             "Redis for the webhook delivery queue")
        pool = await once_reachable(lambda: arq_pool(self.queue_url), Outage(_log, "webhook service start"), stop)
        if pool is None:  # stopped before Redis came back
            return
        redis = connect(self.redis_url)
        http = new_http_client()
        deliverer = Deliverer(redis, http, self.policy, self.allow)
        workers: list[Worker] = []
        relay = Relay(redis, pool, self.policy, QUEUE, block_ms=self.block_ms)
        tasks = [asyncio.create_task(relay.run(stop)),
                 asyncio.create_task(self._deliver(pool, deliverer, stop, workers))]
        stopped = asyncio.create_task(stop.wait())
        _log.info("webhook service started", queue=QUEUE, delays=self.policy.delays)
        try:
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopped}:
                task.result()  # a relay or worker that ended on its own: raise its error
        finally:
            stop.set()
            stopped.cancel()
            for task in tasks:  # the relay and arq's polling loop; attempts in flight are worker.tasks
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for worker in workers:
                await _drain(worker)
            with contextlib.suppress(*REDIS_DOWN):
                await pool.delete(QUEUE + ":health-check")
            await pool.aclose()
            await http.aclose()
            await redis.aclose()
            _log.info("webhook service stopped")

    def _worker(self, pool: ArqRedis, deliverer: Deliverer) -> Worker:
        return Worker([_function(self.policy)], queue_name=QUEUE, redis_pool=pool, handle_signals=False,
                      ctx={CTX_KEY: deliverer}, poll_delay=self.poll_delay, keep_result=KEEP_RESULT_S,
                      job_serializer=_dumps, job_deserializer=json.loads)

    async def _deliver(self, pool: ArqRedis, deliverer: Deliverer, stop: asyncio.Event,
                       workers: list[Worker]) -> None:
        """arq's polling loop ends at the first Redis error, a full Redis's refusal of its health record
        included; after an outage a fresh arq worker takes over (a fresh one: the old one's job counter may
        hold slots of jobs it could not start). Attempts the old one has in flight run on and are drained
        at stop. While the outage lasts, the fresh worker's health record is the probe: a full Redis
        answers a ping but still refuses writes."""
        outage = Outage(_log, "webhook delivery")
        while not stop.is_set():
            worker = self._worker(pool, deliverer)
            try:
                if outage.ongoing:
                    await worker.record_health()
                    outage.restored()
                workers[:] = [w for w in workers if any(not t.done() for t in w.tasks.values())] + [worker]
                await worker.async_run()
            except Exception as e:
                if not waits_out(e):
                    raise
                await asyncio.sleep(outage.lost(e))


async def _drain(worker: Worker) -> None:
    """Let attempts in flight finish for DRAIN_S, then cancel the rest: arq puts those back on the
    queue and runs them again (same webhook-id, so a receiver that got one anyway can dedupe)."""
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        _, late = await asyncio.wait(running, timeout=DRAIN_S)
        for task in late:
            task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)


async def _startup(ctx: dict) -> None:
    url = Settings.from_env().redis_url or "redis://localhost:6379"
    policy = RetryPolicy.from_env()
    ctx[CTX_KEY] = Deliverer(connect(url), new_http_client(), policy)


async def _shutdown(ctx: dict) -> None:
    deliverer: Deliverer = ctx[CTX_KEY]
    await deliverer.http.aclose()
    await deliverer.redis.aclose()


class WorkerSettings:
    """For `arq worker.webhooks.service.WorkerSettings` (delivery only; TOKENQ_REDIS_URL names Redis)."""

    functions = [_function(RetryPolicy.from_env())]
    queue_name = QUEUE
    redis_settings = RedisSettings.from_dsn(Settings.from_env().redis_url or "redis://localhost:6379")
    job_serializer = _dumps
    job_deserializer = json.loads
    keep_result = KEEP_RESULT_S
    on_startup = _startup
    on_shutdown = _shutdown


def run_webhooks(redis_url: str, metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> int:
    """The `tokenq webhooks` process: runs until SIGTERM or SIGINT, then drains and exits 0."""
    import signal

    from prometheus_client import start_http_server

    from tokenq.logs import configure_logging

    configure_logging("webhooks")
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await WebhookService(redis_url).run(stop)

    asyncio.run(main())
    return 0
