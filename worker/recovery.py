"""Leases on stream entries: reclaim what dead workers left, keep our own alive, hand back on drain.

An entry read by a worker stays pending on that worker's consumer until it is acknowledged. Its idle
time is its lease: a live worker re-claims its running entries to itself every lease/3 (`XCLAIM JUSTID`,
which resets the idle time without counting a delivery), so only entries of a worker that died or
stalled grow idle past the lease, and entries a draining worker hands back look idle past it at once.
Any worker with room `XAUTOCLAIM`s those, a lane at a time in the lanes' order (never more than its engine
admits of that lane), and runs them again. An entry delivered more than `max_deliveries` times goes to its
model's dead-letter stream and its job fails: a job that kills every worker that runs it must not go round
forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from jobstore import FinalWrite, JobRef, JobStore
from protocol import keys
from protocol.jobs import JobError, JobPayload, JobState
from protocol.outage import REDIS_DOWN, Outage
from tokenq.logs import get_logger
from tokenq.settings import Settings
from worker import metrics
from worker.publisher import Publisher, RunningJob

log = get_logger("recovery")

LEASE_S = 30.0
MAX_DELIVERIES = 3
DEAD_MAXLEN = 100_000
RELEASED_IDLE_MS = 365 * 24 * 3600 * 1000  # a handed-back entry looks idle past any worker's lease
LOGGED_IDS = 20

@dataclass(frozen=True)
class Claimed:
    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int


class Recovery:
    def __init__(self, redis: Redis, model: str, consumer: str, lease_s: float | None = None,
                 max_deliveries: int | None = None) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        settings = Settings.from_env()
        self.lease_s = lease_s if lease_s is not None else settings.lease_s
        self.max_deliveries = max_deliveries if max_deliveries is not None else settings.max_deliveries
        self.sweep_s = min(max(self.lease_s / 4, 0.1), 5.0)
        self._next_sweep = 0.0
        self.store = JobStore(redis)

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def seconds_to_sweep(self) -> float:
        return max(0.0, self._next_sweep - time.monotonic())

    def start_sweep(self) -> bool:
        """Whether a sweep is due; if so the next one is `sweep_s` away, and the caller claims every lane now
        (one `claim` a lane, in the lanes' order)."""
        if self.seconds_to_sweep() > 0:
            return False
        self._next_sweep = time.monotonic() + self.sweep_s
        return True

    async def claim(self, lane: str, streams: list[str], room: int) -> list[Claimed]:
        """Claim at most `room` entries of one lane's `streams` idle past the lease; those over the delivery
        limit are dead-lettered here, the rest returned to be run."""
        if room <= 0 or not streams:
            return []
        rows = await self.store.claim_stale(streams, self.consumer, self.lease_ms, room)
        runnable: list[Claimed] = []
        for stream, entry_id, flat, deliveries in rows:
            flat = flat or []
            c = Claimed(stream, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)), int(deliveries))
            metrics.RECLAIMED.labels(self.model).inc()
            if c.deliveries > self.max_deliveries:
                await self.dead_letter(c)
            else:
                runnable.append(c)
        if runnable:
            # Routine after a drain or a restart: one line a lane, the jobs at debug.
            log.info("reclaimed entries", lane=lane, entries=len(runnable))
            job_ids = [c.fields.get("job_id") or c.entry_id for c in runnable]
            log.debug("reclaimed entries' jobs", lane=lane, **first_ids(job_ids))
        return runnable

    async def dead_letter(self, c: Claimed) -> None:
        job_id = c.fields.get("job_id") or ""
        ref = await self._ref(job_id, c.fields)
        reason = (f"delivered {c.deliveries} times without finishing (limit {self.max_deliveries}): "
                  "the workers running it died or stalled")
        error = JobError(type="max_deliveries_exceeded", message=reason)
        written = await self.store.dead_letter(FinalWrite(ref, JobState.failed.value, "", error.model_dump_json()),
                                               c.stream, c.entry_id, c.deliveries, reason, DEAD_MAXLEN)
        if written == 1:
            metrics.DEAD_LETTERED.labels(self.model).inc()
            metrics.REQUESTS_FINISHED.labels(self.model, "error").inc()
            log.warning("entry dead-lettered; job failed", job_id=job_id, stream=c.stream, entry_id=c.entry_id,
                        deliveries=c.deliveries)
        else:
            metrics.DUPLICATE_FINALS.labels(self.model).inc()
            log.info("stale entry of an already final job dropped", job_id=job_id, entry_id=c.entry_id)

    async def _ref(self, job_id: str, fields: dict[str, str]) -> JobRef:
        try:
            payload = JobPayload.model_validate_json(fields.get("payload") or "")
            return JobRef.of(payload)
        except ValueError:
            record = await self.redis.hgetall(keys.job_key(job_id)) if job_id else {}
            return JobRef.of_record(job_id, record)

    async def keep_alive(self, jobs: Iterable[RunningJob]) -> list[str]:
        """Reset the idle time of our running entries; returns the entry ids that are no longer ours."""
        jobs = list(jobs)
        if not jobs:
            return []
        return await self.store.keep_alive([(j.stream, j.entry_id) for j in jobs], self.consumer)

    async def run_keep_alive(self, publisher: Publisher) -> None:
        """Every lease/3 until cancelled: keep our entries; stop running jobs another worker took over."""
        outage = Outage(log, "lease refresh")
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                running = list(publisher.jobs.values())
                lost = set(await self.keep_alive([*running, *publisher.finishing.values()]))
                outage.restored()
            except REDIS_DOWN as e:  # Redis away: the lease may lapse, and someone else reruns the job
                outage.lost(e)
                continue
            except Exception as e:
                log.warning("lease refresh failed", error=repr(e))
                continue
            for job in running:
                if job.entry_id in lost and publisher.forget(job.id):
                    log.warning("lease lost: another worker took this job over; aborting it here", job_id=job.id)

    async def release(self, jobs: Iterable[RunningJob]) -> int:
        """Hand unfinished entries back so that another worker can claim them at once."""
        jobs = list(jobs)
        if not jobs:
            return 0
        n = await self.store.release([(j.stream, j.entry_id, j.id) for j in jobs], self.consumer, RELEASED_IDLE_MS)
        metrics.RELEASED.labels(self.model).inc(n)
        log.info("handed unfinished jobs back", jobs=len(jobs), released=n, **first_ids(sorted(j.id for j in jobs)))
        return n


def first_ids(ids: list[str]) -> dict[str, object]:
    """The first LOGGED_IDS of `ids` and how many more: a log line stays short whatever the count (log
    shippers cut long lines)."""
    return {"job_ids": ids[:LOGGED_IDS], "more": max(0, len(ids) - LOGGED_IDS)}
