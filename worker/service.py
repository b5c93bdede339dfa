"""One worker process: heartbeat + intake + publisher + recovery around one engine.

The engine runs in its own process (`EngineSpec` -> engine_process.EngineProcess), or, for an engine object
built in this process (test doubles), in a thread (engine_loop.EngineLoop). If the engine dies, the
worker drains what it can, hands its running jobs back and exits non-zero.

`WorkerService.run()` serves until its stop event is set; `serve()` adds logging and SIGINT/SIGTERM.
On stop (drain) the worker pulls no more jobs, gives running ones a grace (`TOKENQ_DRAIN_GRACE_S`) to
finish, then hands the rest back unacknowledged, claimable by another worker at once (see recovery.py).
The Redis client retries with exponential backoff, and every loop retries on its own, so a Redis
restart or a network blip only pauses the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobstore.connect import AnyRedis, connect, is_cluster, is_cluster_url
from jobstore.pipe import RedisPipe
from protocol.hot_loop import HotLoop
from protocol.outage import Outage, once_reachable
from protocol.workers import ModelCard
from tokenq.logs import configure_logging, get_logger
from tokenq.settings import Settings
from worker import metrics
from worker.engine_loop import EngineHandle, EngineLoop
from worker.engine_process import EngineProcess, EngineSpec
from worker.heartbeat import Heartbeat
from worker.intake import Intake
from worker.metrics import start_metrics_server
from worker.pruning import Pruner
from worker.publisher import Publisher
from worker.recovery import Recovery
from worker.token_text import TokenText, token_text_from

log = get_logger("service")

GRACE_S = 10.0
RETRIES = 5
CONNECT_TIMEOUT_S = 5.0


def drain_grace_s() -> float:
    """How long a stopping worker lets running jobs finish (TOKENQ_DRAIN_GRACE_S)."""
    return Settings.from_env().drain_grace_s


def redis_client(url: str) -> AnyRedis:
    """A client that reconnects by itself: each command is retried with exponential backoff (capped at 2 s)
    on connection errors and timeouts before the caller's own retry loop sees the error. A cluster's URL
    (jobstore/connect.py) gives redis-py's cluster client, which retries on a lost node itself."""
    if is_cluster_url(url):
        return connect(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True)
    return aioredis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
                             retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=RETRIES),
                             retry_on_error=[RedisConnectionError, RedisTimeoutError], health_check_interval=15)


def default_worker_id() -> str:
    """`{host}:{pid}`: the consumer name in the `workers` group and the heartbeat id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _engine_capacity(engine) -> int:
    """Sequences the engine holds at once, for the heartbeat (the interface has no field for it)."""
    for obj in (engine, getattr(engine, "config", None)):
        value = getattr(obj, "max_num_seqs", None)
        if isinstance(value, int):
            return value
    return engine.num_admissible()


def kv_cache_size(engine) -> dict:
    """Blocks, block size and the tokens they hold, for the start-up log line (what the engine reports)."""
    try:
        blocks = int(engine.stats().get("num_blocks", 0))
    except Exception:
        blocks = 0
    block_size = int(getattr(getattr(engine, "config", None), "block_size", 0) or 0)
    return {"blocks": blocks, "block_size": block_size, "tokens": blocks * block_size}


class WorkerService:
    def __init__(self, redis_url: str, model_name: str, engine, card: ModelCard | None,
                 worker_id: str | None = None,
                 metrics_port: int | None = None, *, metrics_host: str = "0.0.0.0", grace_s: float | None = None,
                 token_text: TokenText | None = None, block_ms: int = 500, lease_s: float | None = None,
                 max_deliveries: int | None = None, hot_loop: bool | None = None) -> None:
        self.redis_url = redis_url
        self.model_name = model_name
        self.engine = engine
        self.card = card
        self.worker_id = worker_id or default_worker_id()
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.grace_s = grace_s if grace_s is not None else drain_grace_s()
        self.token_text = token_text
        self.block_ms = block_ms
        self.lease_s = lease_s  # None: TOKENQ_LEASE_S (see recovery.py)
        self.max_deliveries = max_deliveries
        self.hot_loop = Settings.from_env().hot_loop if hot_loop is None else hot_loop
        self.skip_grace = asyncio.Event()  # a second signal: exit without waiting for running jobs
        self.engine_loop: EngineHandle | None = None
        self.publisher: Publisher | None = None
        self.recovery: Recovery | None = None
        self.engine_failed = False  # the engine died under us: the process exits non-zero
        self.kv_cache: dict = {}  # blocks, block size and tokens, as the engine reports them at start

    async def _start_engine(self) -> tuple[EngineHandle, ModelCard, int, int, str]:
        """The engine's handle, card, max_model_len, capacity and device."""
        if isinstance(self.engine, EngineSpec):
            handle = EngineProcess(self.engine)
            info = await handle.start()
            self.kv_cache = {"blocks": info.kv_blocks, "block_size": info.block_size,
                             "tokens": info.kv_blocks * info.block_size}
            return handle, self.card or info.card, info.max_model_len, info.max_num_seqs, info.device
        assert self.card is not None, "an engine object needs its model card"
        self.kv_cache = kv_cache_size(self.engine)
        loop = EngineLoop(self.engine, name=self.model_name)
        loop.start()
        return (loop, self.card, self.engine.max_model_len, _engine_capacity(self.engine),
                str(getattr(self.engine, "device", "cpu")))

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        stop_event = stop_event or asyncio.Event()
        if self.metrics_port:
            start_metrics_server(self.metrics_port, self.metrics_host)
        engine_loop, card, max_model_len, capacity, device = await self._start_engine()
        self.engine_loop, self.card = engine_loop, card
        if self.token_text is None:
            in_process = None if isinstance(self.engine, EngineSpec) else self.engine
            self.token_text = await asyncio.to_thread(token_text_from, in_process, card)
        redis = redis_client(self.redis_url)
        if await once_reachable(redis.ping, Outage(log, "worker start"), stop_event) is None:
            await engine_loop.close()  # stopped before Redis came back
            await redis.aclose()
            return
        # Each step's deltas go out on one shared pipelined connection: a token's way to its reader costs the
        # worker a fraction of a redis-py command's CPU.
        pipe = RedisPipe(redis, RETRIES, CONNECT_TIMEOUT_S)
        publisher = self.publisher = Publisher(redis, engine_loop, self.model_name, token_text=self.token_text,
                                               scripts=None if is_cluster(redis) else pipe)
        recovery = self.recovery = Recovery(redis, self.model_name, self.worker_id, lease_s=self.lease_s,
                                            max_deliveries=self.max_deliveries)
        intake = Intake(redis, engine_loop, publisher, self.model_name, self.worker_id,
                        max_model_len=max_model_len, block_ms=self.block_ms, recovery=recovery,
                        pruner=Pruner(redis, self.model_name))
        heartbeat = Heartbeat(redis, self.worker_id, card, engine_loop, capacity=capacity, device=device)
        log.info("kv cache", model=self.model_name, **self.kv_cache)
        if self.kv_cache.get("blocks"):  # a size fixed at start: on dashboards before the first job's stats
            metrics.KV_BLOCKS.labels(card.name).set(self.kv_cache["blocks"])
        metrics.start_series(self.model_name)
        log.info("worker starting", worker=self.worker_id, model=self.model_name, lease_s=recovery.lease_s)
        tasks: list[asyncio.Task] = []
        try:
            await intake.ensure_groups()
            await heartbeat.start()
            intake_task = asyncio.create_task(intake.run(), name="intake")
            publisher_task = asyncio.create_task(publisher.run(), name="publisher")
            tasks = [intake_task, publisher_task, asyncio.create_task(heartbeat.run(), name="heartbeat"),
                     asyncio.create_task(recovery.run_keep_alive(publisher), name="keep-alive")]
            if self.hot_loop:  # poll while a job runs
                hot = HotLoop(publisher.reports_due)
                publisher.on_expect = hot.poke
                tasks.append(asyncio.create_task(hot.run(), name="hot-loop"))
            stop_wait = asyncio.create_task(stop_event.wait())
            assert engine_loop.dead is not None
            dead_wait = asyncio.create_task(engine_loop.dead.wait())
            done, _ = await asyncio.wait([*tasks, stop_wait, dead_wait], return_when=asyncio.FIRST_COMPLETED)
            for t in (stop_wait, dead_wait):
                t.cancel()
            for t in done:
                if t in tasks and not t.cancelled() and t.exception() is not None:
                    log.error("worker task crashed", task=t.get_name(), error=repr(t.exception()))
            if dead_wait in done:
                self.engine_failed = True
                log.error("engine died; exiting", error=engine_loop.error)

            # Drain: stop pulling, let what runs finish (the publisher keeps writing results and the leases
            # stay alive meanwhile), then stop the publisher once its writes in flight are done.
            intake.stopped = True
            intake_task.cancel()
            await asyncio.gather(intake_task, return_exceptions=True)
            await self._grace(publisher, publisher_task, engine_loop)
            publisher.stopped = True
            await asyncio.wait([publisher_task], timeout=2.0)
        finally:
            intake.stopped = publisher.stopped = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await engine_loop.close()
            await self._hand_back(recovery, publisher)
            try:
                await heartbeat.stop()
            except Exception as e:
                log.warning("could not remove heartbeat", error=repr(e))
            await intake.aclose()
            await pipe.aclose()
            await redis.aclose()
            log.info("worker stopped", worker=self.worker_id)

    async def _grace(self, publisher: Publisher, publisher_task: asyncio.Task, engine_loop: EngineHandle) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while (publisher.busy and loop.time() < deadline and not publisher_task.done()
               and engine_loop.alive and not self.skip_grace.is_set()):
            await asyncio.sleep(0.05)

    async def _hand_back(self, recovery: Recovery, publisher: Publisher) -> None:
        """Unfinished entries go back to the group at once (the keep-alive task is stopped by now, so
        nothing renews them); if Redis is away they become claimable when their lease lapses."""
        left = [*publisher.jobs.values(), *publisher.finishing.values()]
        publisher.jobs.clear()
        publisher.finishing.clear()
        if not left:
            return
        try:
            await asyncio.wait_for(recovery.release(left), timeout=5.0)
        except Exception as e:
            log.warning("could not hand unfinished jobs back; they are claimable after the lease",
                        jobs=sorted(j.id for j in left), error=repr(e))


def serve(redis_url: str, model_name: str, engine, card: ModelCard | None = None, metrics_port: int | None = None,
          worker_id: str | None = None, grace_s: float | None = None, metrics_host: str = "0.0.0.0") -> int:
    """Run a worker until SIGINT/SIGTERM: drain (a second signal skips the grace for running jobs). Returns
    the exit status: 1 when the engine died."""
    configure_logging("worker")
    service = WorkerService(redis_url, model_name, engine, card, worker_id=worker_id, metrics_port=metrics_port,
                            metrics_host=metrics_host, grace_s=grace_s)

    async def main() -> None:
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                service.skip_grace.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await service.run(stop)

    run_event_loop(main())
    return 1 if service.engine_failed else 0


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (it comes with uvicorn[standard]): its loop does less Python per wake-up
    and per socket read than asyncio's, and every wake-up on a job's path to its first token counts."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
