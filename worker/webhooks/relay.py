"""The outbox relay: each entry a job's first final write (on its model's `keys.webhook_outbox`) or a
batch's end (on `keys.WEBHOOK_OUTBOX`) put on an outbox becomes one arq delivery job. The relay reads every
outbox at once: the batches' and one per model a worker has served.

Read with a consumer group, so an entry is removed only after its job is enqueued; entries a crashed
relay had read are claimed back after CLAIM_IDLE_MS, and those of a round that Redis cut short (away, or full
and refusing the enqueue) are read again by the same relay at its next round. The arq job id
`webhook:{job_id}` makes a second enqueue of the same job (a relay crash between enqueue and XACK) a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from jobstore.connect import AnyRedis, is_cluster, pipeline
from protocol import keys
from protocol.outage import REDIS_DOWN, Outage, is_redis_oom
from tokenq.logs import get_logger
from worker.webhooks.delivery import FUNCTION
from worker.webhooks.metrics import RELAYED
from worker.webhooks.policy import RetryPolicy

GROUP = "webhooks"
CLAIM_IDLE_MS = 30_000
CLUSTER_POLL_S = 0.2
_log = get_logger("webhooks.relay")


def arq_job_id(job_id: str) -> str:
    return f"webhook:{job_id}"


class Relay:
    def __init__(self, redis: AnyRedis, arq: ArqRedis, policy: RetryPolicy, queue: str,
                 consumer: str | None = None, block_ms: int = 1000, count: int = 100) -> None:
        self.redis = redis  # decode_responses=True
        self.arq = arq
        self.policy = policy
        self.queue = queue
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.block_ms = block_ms
        self.count = count

        self.outboxes: list[str] = []  # those with our group on them
        self.cut_short = False  # a round failed: entries it had read may still be pending on this consumer

    async def ensure_group(self, outbox: str = keys.WEBHOOK_OUTBOX) -> None:
        try:  # from the stream's start: entries written before any relay ran are delivered too
            await self.redis.xgroup_create(outbox, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _refresh(self) -> None:
        """Take on the outbox of each model a worker has served since the last look."""
        models = await self.redis.smembers(keys.MODELS_SET)
        for outbox in [keys.WEBHOOK_OUTBOX, *(keys.webhook_outbox(m) for m in sorted(models))]:
            if outbox not in self.outboxes:
                await self.ensure_group(outbox)
                self.outboxes.append(outbox)

    async def run_once(self) -> int:
        """Relay claimed-back entries, then new ones (waiting up to block_ms); returns how many."""
        await self._refresh()
        entries: list[tuple[str, str, dict[str, str] | None]] = []
        for outbox in self.outboxes:
            _, claimed, *_ = await self.redis.xautoclaim(outbox, GROUP, self.consumer, min_idle_time=CLAIM_IDLE_MS,
                                                         start_id="0-0", count=self.count)
            entries += [(outbox, entry_id, fields) for entry_id, fields in claimed]
        if not entries and self.cut_short:  # "0": this consumer's own pending entries, without blocking
            entries = await self._read("0")
            self.cut_short = bool(entries)  # until none is left
        if not entries:
            entries = await self._read(">")
        for outbox, entry_id, fields in entries:
            await self._relay(outbox, entry_id, fields)
        return len(entries)

    async def _read(self, since: str) -> list[tuple[str, str, dict[str, str] | None]]:
        if is_cluster(self.redis):
            return await self._read_each(since)
        read = await self.redis.xreadgroup(GROUP, self.consumer, dict.fromkeys(self.outboxes, since),
                                           count=self.count, block=self.block_ms)
        return [(outbox, entry_id, fields) for outbox, got in read or [] for entry_id, fields in got]

    async def _read_each(self, since: str) -> list[tuple[str, str, dict[str, str] | None]]:
        """On a cluster the outboxes lie in different slots, so no one read blocks on them all: each is read
        without blocking, and an empty round of new entries waits CLUSTER_POLL_S."""
        entries = []
        for outbox in self.outboxes:
            read = await self.redis.xreadgroup(GROUP, self.consumer, {outbox: since}, count=self.count)
            entries += [(outbox, entry_id, fields) for _, got in read or [] for entry_id, fields in got]
        if not entries and since == ">":
            await asyncio.sleep(min(self.block_ms / 1000, CLUSTER_POLL_S))
        return entries

    async def _relay(self, outbox: str, entry_id: str, fields: dict[str, str] | None) -> None:
        job_id = (fields or {}).get("job_id") or (fields or {}).get("batch_id")
        if job_id:
            # Expiry covers the whole retry schedule; arq's default (a day) would drop late retries.
            job = await self.arq.enqueue_job(FUNCTION, job_id, _job_id=arq_job_id(job_id),
                                             _queue_name=self.queue, _expires=self.policy.horizon_s + 3600)
            RELAYED.inc()
            _log.info("webhook queued", job_id=job_id, state=fields.get("state"), duplicate=job is None)
        else:
            _log.warning("malformed outbox entry dropped", entry_id=entry_id, fields=fields)
        async with pipeline(self.redis) as pipe:
            pipe.xack(outbox, GROUP, entry_id)
            pipe.xdel(outbox, entry_id)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until `stop`; a Redis that is away, or full and refusing writes (the group's creation, the
        enqueue), is waited out with back-off, never fatal."""
        outage = Outage(_log, "webhook relay")
        while not stop.is_set():
            try:
                await self.run_once()
                outage.restored()
            except REDIS_DOWN as e:  # before ResponseError: a cluster's node down is one
                self.cut_short = True
                await asyncio.sleep(outage.lost(e))
            except ResponseError as e:
                self.cut_short = True
                if is_redis_oom(e):
                    await asyncio.sleep(outage.lost(e))
                elif "NOGROUP" in str(e):  # the stream or group was deleted under us (a Redis without its data)
                    self.outboxes.clear()
                else:
                    raise
