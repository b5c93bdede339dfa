"""The worker's registry entry: a heartbeat key with a TTL, the workers set, and the model card (written
again by a beat that finds it gone, e.g. after a Redis restart without persistence)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from jobstore import JobStore
from jobstore.connect import pipeline
from protocol import keys
from protocol.outage import REDIS_DOWN, Outage
from protocol.workers import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, ModelCard, WorkerHeartbeat
from tokenq.logs import get_logger
from worker import metrics
from worker.engine_loop import EngineHandle
from worker.throughput import Throughput

log = get_logger("heartbeat")


class Heartbeat:
    def __init__(self, redis: Redis, worker_id: str, card: ModelCard, engine_loop: EngineHandle,
                 capacity: int, device: str = "cpu", interval: float = HEARTBEAT_INTERVAL_S,
                 ttl: int = HEARTBEAT_TTL_S) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.card = card
        self.engine_loop = engine_loop
        self.capacity = capacity
        self.device = device
        self.interval = interval
        self.ttl = ttl
        self.store = JobStore(redis)
        self.throughput = Throughput(card.name)
        self.card_digest = card.digest()

    def heartbeat(self, stats: dict | None = None, rates: dict[str, float] | None = None) -> WorkerHeartbeat:
        stats = self.engine_loop.stats() if stats is None else stats
        rates = self.throughput.sample() if rates is None else rates
        return WorkerHeartbeat(worker_id=self.worker_id, model=self.card.name,
                               max_model_len=self.card.max_model_len, capacity=self.capacity,
                               running=int(stats.get("running", 0)), waiting=int(stats.get("waiting", 0)),
                               device=self.device, kv_usage=float(stats.get("kv_usage", 0.0)),
                               tokens_per_s=rates["generation_tokens_per_s"],
                               generation_tokens=rates["generation_tokens"], card_digest=self.card_digest)

    async def start(self) -> None:
        """Publish the model card, then the first heartbeat (so the gateway never lists a model without
        its card)."""
        await self._write_card()
        await self.beat()

    async def _write_card(self) -> None:
        await self.redis.hset(keys.model_card_key(self.card.name),
                              mapping={keys.MODEL_CARD_FIELD: self.card.model_dump_json(),
                                       keys.MODEL_CARD_DIGEST_FIELD: self.card_digest})

    async def beat(self) -> None:
        stats = self.engine_loop.stats()
        rates = self.throughput.sample()
        hb = self.heartbeat(stats, rates)
        metrics.observe_engine_stats(self.card.name, stats)
        self.throughput.maybe_log(rates, stats)
        pipe = pipeline(self.redis)
        pipe.set(keys.worker_key(self.worker_id), hb.model_dump_json(), ex=self.ttl)
        pipe.sadd(keys.WORKERS_SET, self.worker_id)
        pipe.sadd(keys.MODELS_SET, self.card.name)  # remembered: its jobs are accepted while no worker is live
        pipe.hexists(keys.model_card_key(self.card.name), keys.MODEL_CARD_FIELD)
        *_, has_card = await pipe.execute()
        if not has_card:
            await self._write_card()
        await self.observe_queue_depth()

    async def observe_queue_depth(self) -> dict[str, int]:
        """Jobs queued or running per lane over every tenant, for the tokenq_queue_depth gauge (one stream per
        tenant means no single stream's lag says how much work waits, and KEDA's redis-streams trigger
        watches one stream): the lane counters that admission keeps, read through the job store."""
        depth = await self.store.depth(self.card.name)
        for lane, n in depth.items():
            metrics.QUEUE_DEPTH.labels(self.card.name, lane).set(n)
        return depth

    async def run(self) -> None:
        """Beat every interval until cancelled; a missed beat is logged (once per Redis outage), not fatal."""
        outage = Outage(log, "heartbeat")
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
                outage.restored()
            except REDIS_DOWN as e:
                outage.lost(e)
            except Exception as e:
                log.warning("heartbeat failed", error=repr(e))

    async def stop(self) -> None:
        pipe = pipeline(self.redis)
        pipe.delete(keys.worker_key(self.worker_id))
        pipe.srem(keys.WORKERS_SET, self.worker_id)
        await pipe.execute()
