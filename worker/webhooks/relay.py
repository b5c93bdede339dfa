"""The outbox relay: each entry FINISH_JOB (or a batch's end) put on `keys.WEBHOOK_OUTBOX` becomes one arq
delivery job.

Read with a consumer group, so an entry is removed only after its job is enqueued; entries a crashed
relay had read are claimed back after CLAIM_IDLE_MS. The arq job id `webhook:{job_id}` makes a second
enqueue of the same job (a relay crash between enqueue and XACK) a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from protocol import keys
from protocol.outage import REDIS_DOWN, Outage
from worker.logging import get_logger
from worker.webhooks.delivery import FUNCTION
from worker.webhooks.metrics import RELAYED
from worker.webhooks.policy import RetryPolicy

GROUP = "webhooks"
CLAIM_IDLE_MS = 30_000
_log = get_logger("webhooks.relay")


def arq_job_id(job_id: str) -> str:
    return f"webhook:{job_id}"


class Relay:
    def __init__(self, redis: aioredis.Redis, arq: ArqRedis, policy: RetryPolicy, queue: str,
                 consumer: str | None = None, block_ms: int = 1000, count: int = 100) -> None:
        self.redis = redis  # decode_responses=True
        self.arq = arq
        self.policy = policy
        self.queue = queue
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.block_ms = block_ms
        self.count = count

    async def ensure_group(self) -> None:
        try:  # from the stream's start: entries written before any relay ran are delivered too
            await self.redis.xgroup_create(keys.WEBHOOK_OUTBOX, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run_once(self) -> int:
        """Relay claimed-back entries, then new ones (waiting up to block_ms); returns how many."""
        _, claimed, *_ = await self.redis.xautoclaim(keys.WEBHOOK_OUTBOX, GROUP, self.consumer,
                                                     min_idle_time=CLAIM_IDLE_MS, start_id="0-0",
                                                     count=self.count)
        entries = list(claimed)
        if not entries:
            read = await self.redis.xreadgroup(GROUP, self.consumer, {keys.WEBHOOK_OUTBOX: ">"},
                                               count=self.count, block=self.block_ms)
            entries = read[0][1] if read else []
        for entry_id, fields in entries:
            await self._relay(entry_id, fields)
        return len(entries)

    async def _relay(self, entry_id: str, fields: dict[str, str] | None) -> None:
        job_id = (fields or {}).get("job_id") or (fields or {}).get("batch_id")
        if job_id:
            # Expiry covers the whole retry schedule; arq's default (a day) would drop late retries.
            job = await self.arq.enqueue_job(FUNCTION, job_id, _job_id=arq_job_id(job_id),
                                             _queue_name=self.queue, _expires=self.policy.horizon_s + 3600)
            RELAYED.inc()
            _log.info("webhook queued", job_id=job_id, state=fields.get("state"), duplicate=job is None)
        else:
            _log.warning("malformed outbox entry dropped", entry_id=entry_id, fields=fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.WEBHOOK_OUTBOX, GROUP, entry_id)
            pipe.xdel(keys.WEBHOOK_OUTBOX, entry_id)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        outage = Outage(_log, "webhook relay")
        grouped = False
        while not stop.is_set():
            try:
                if not grouped:
                    await self.ensure_group()
                    grouped = True
                await self.run_once()
                outage.restored()
            except REDIS_DOWN as e:  # Redis away: try again after a back-off
                await asyncio.sleep(outage.lost(e))
            except ResponseError as e:  # the stream or group was deleted under us (a Redis without its data)
                if "NOGROUP" not in str(e):
                    raise
                grouped = False
