"""Leases on stream entries: reclaim what dead workers left, keep our own alive, hand back on drain.

An entry read by a worker stays pending on that worker's consumer until it is acknowledged. Its idle
time is its lease: a live worker re-claims its running entries to itself every lease/3 (`XCLAIM JUSTID`,
which resets the idle time without counting a delivery), so only entries of a worker that died or
stalled grow idle past the lease. Any worker with room `XAUTOCLAIM`s those (never more than its engine
admits) and runs them again. An entry delivered more than `max_deliveries` times goes to `tokenq:dead`
and its job fails: a job that kills every worker that runs it must not go round forever.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobError, JobPayload, JobState
from protocol.scripts import FINISH_JOB, finish_keys
from worker import metrics
from worker.logging import get_logger
from worker.publisher import Publisher, RunningJob

log = get_logger("recovery")

LEASE_S = 30.0
MAX_DELIVERIES = 3
DEAD_MAXLEN = 100_000
RELEASED_IDLE_MS = 365 * 24 * 3600 * 1000  # a handed-back entry looks idle past any worker's lease

# KEYS: the streams to sweep. ARGV: group, consumer, min idle ms, most entries to claim.
# Returns {stream, entry id, fields, deliveries (this claim included)} per claimed entry.
# Streams whose group is gone are skipped (pcall); entries deleted from the stream are dropped by
# XAUTOCLAIM itself (Redis 7).
CLAIM_STALE = """
local out, left = {}, tonumber(ARGV[4])
for _, stream in ipairs(KEYS) do
  if left <= 0 then break end
  local cursor = '0-0'
  repeat
    local r = redis.pcall('XAUTOCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', left)
    if r['err'] then break end
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      local p = redis.call('XPENDING', stream, ARGV[1], e[1], e[1], 1)
      out[#out + 1] = {stream, e[1], e[2], p[1][4]}
      left = left - 1
    end
  until cursor == '0-0' or left <= 0
end
return out
"""

# KEYS[i]: the stream of entry i. ARGV: group, consumer, then the entry ids.
# Resets the idle time of each entry still pending on this consumer; returns the ids that are not
# (acknowledged meanwhile, or claimed by another worker after our lease lapsed).
KEEP_ALIVE = """
local lost = {}
for i, stream in ipairs(KEYS) do
  local id = ARGV[i + 2]
  local p = redis.call('XPENDING', stream, ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# KEYS: pairs (stream, job hash) per entry. ARGV: group, consumer, idle ms, then the entry ids.
# Hands entries still pending on this consumer back: idle past any lease, the delivery that is given
# back not counted; the job goes back to `queued` if this worker was running it. Returns how many.
RELEASE = f"""
local n = 0
for i = 4, #ARGV do
  local stream, job, id = KEYS[2 * (i - 3) - 1], KEYS[2 * (i - 3)], ARGV[i]
  local p = redis.call('XPENDING', stream, ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local retry = math.max(tonumber(p[1][4]) - 1, 0)
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', retry, 'JUSTID')
    if redis.call('HGET', job, '{f.STATE}') == 'running' and redis.call('HGET', job, '{f.WORKER}') == ARGV[2] then
      redis.call('HSET', job, '{f.STATE}', 'queued')
    end
    n = n + 1
  end
end
return n
"""

# KEYS: 1-3 as FINISH_JOB, 4 the entry's stream, 5 the dead-letter stream.
# ARGV: 1-9 as FINISH_JOB, 10 group, 11 entry id, 12 deliveries, 13 reason, 14 dead stream max length.
# Fails the job (first final write only; a job already final is just dropped) and records it as dead,
# then acknowledges and deletes the entry, all at once. Returns FINISH_JOB's answer.
DEAD_LETTER = f"""
local function finish_job()
{FINISH_JOB}
end
local written = finish_job()
if written == 1 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[14], '*', 'job_id', ARGV[9], 'stream', KEYS[4],
             'entry_id', ARGV[11], 'deliveries', ARGV[12], 'reason', ARGV[13])
end
redis.call('XACK', KEYS[4], ARGV[10], ARGV[11])
redis.call('XDEL', KEYS[4], ARGV[11])
return written
"""


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


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
        self.lease_s = lease_s if lease_s is not None else _env_float("TOKENQ_LEASE_S", LEASE_S)
        self.max_deliveries = (max_deliveries if max_deliveries is not None
                               else int(_env_float("TOKENQ_MAX_DELIVERIES", MAX_DELIVERIES)))
        self.sweep_s = min(max(self.lease_s / 4, 0.1), 5.0)
        self._next_sweep = 0.0
        self._claim = redis.register_script(CLAIM_STALE)
        self._keep = redis.register_script(KEEP_ALIVE)
        self._release = redis.register_script(RELEASE)
        self._dead = redis.register_script(DEAD_LETTER)

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def seconds_to_sweep(self) -> float:
        return max(0.0, self._next_sweep - time.monotonic())

    async def claim(self, streams: list[str], room: int) -> list[Claimed]:
        """Claim at most `room` entries idle past the lease; those over the delivery limit are dead-lettered
        here, the rest returned to be run."""
        self._next_sweep = time.monotonic() + self.sweep_s
        if room <= 0 or not streams:
            return []
        rows = await self._claim(keys=streams, args=[keys.GROUP, self.consumer, self.lease_ms, room])
        runnable: list[Claimed] = []
        for stream, entry_id, flat, deliveries in rows:
            flat = flat or []
            c = Claimed(stream, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)), int(deliveries))
            metrics.RECLAIMED.labels(self.model).inc()
            if c.deliveries > self.max_deliveries:
                await self.dead_letter(c)
            else:
                log.info("reclaimed a stale entry", stream=stream, entry_id=entry_id, deliveries=c.deliveries,
                         job_id=c.fields.get("job_id"))
                runnable.append(c)
        return runnable

    async def dead_letter(self, c: Claimed) -> None:
        job_id = c.fields.get("job_id") or ""
        tenant = await self._tenant(job_id, c.fields)
        reason = (f"delivered {c.deliveries} times without finishing (limit {self.max_deliveries}): "
                  "the workers running it died or stalled")
        error = JobError(type="max_deliveries_exceeded", message=reason)
        written = await self._dead(
            keys=[*finish_keys(job_id, tenant), c.stream, keys.DEAD_STREAM],
            args=[keys.events_channel(job_id), JobState.failed.value, f.ERROR, error.model_dump_json(),
                  repr(time.time()), "", f.RETENTION_SECONDS, "", job_id,
                  keys.GROUP, c.entry_id, c.deliveries, reason, DEAD_MAXLEN])
        if written == 1:
            metrics.DEAD_LETTERED.labels(self.model).inc()
            metrics.REQUESTS_FINISHED.labels(self.model, "error").inc()
            log.warning("entry dead-lettered; job failed", job_id=job_id, stream=c.stream, entry_id=c.entry_id,
                        deliveries=c.deliveries)
        else:
            metrics.DUPLICATE_FINALS.labels(self.model).inc()
            log.info("stale entry of an already final job dropped", job_id=job_id, entry_id=c.entry_id)

    async def _tenant(self, job_id: str, fields: dict[str, str]) -> str:
        try:
            return JobPayload.model_validate_json(fields.get("payload") or "").tenant
        except ValueError:
            return (await self.redis.hget(keys.job_key(job_id), f.TENANT) if job_id else None) or "default"

    async def keep_alive(self, jobs: Iterable[RunningJob]) -> list[str]:
        """Reset the idle time of our running entries; returns the entry ids that are no longer ours."""
        jobs = list(jobs)
        if not jobs:
            return []
        return await self._keep(keys=[j.stream for j in jobs],
                                args=[keys.GROUP, self.consumer, *(j.entry_id for j in jobs)])

    async def run_keep_alive(self, publisher: Publisher) -> None:
        """Every lease/3 until cancelled: keep our entries; stop running jobs another worker took over."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                running = list(publisher.jobs.values())
                lost = set(await self.keep_alive([*running, *publisher.finishing.values()]))
            except Exception as e:  # Redis away: the lease may lapse, and someone else reruns the job
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
        pairs = [k for j in jobs for k in (j.stream, keys.job_key(j.id))]
        n = int(await self._release(keys=pairs, args=[keys.GROUP, self.consumer, RELEASED_IDLE_MS,
                                                      *(j.entry_id for j in jobs)]))
        metrics.RELEASED.labels(self.model).inc(n)
        log.info("handed unfinished jobs back", jobs=sorted(j.id for j in jobs), released=n)
        return n
