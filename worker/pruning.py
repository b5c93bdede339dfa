"""Housekeeping of a model's queue. Each tenant gets a stream per lane, and each worker that ever read one
is a consumer in its group; neither goes away by itself. Intake reads every tenant stream of a lane, so
streams of tenants long gone cost every read, and consumers of workers long gone fill XINFO. Here a tenant
stream that has been empty for `idle_s` leaves its lane (one script, atomic against the gateway's submit,
which re-adds both in one script), and consumers without pending entries whose worker has no heartbeat
leave the group (jobstore's PRUNE_STREAM). Any worker may run it; running it twice does no harm."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from jobstore import JobStore
from jobstore.connect import mget
from protocol import keys
from tokenq.logs import get_logger

log = get_logger("pruning")

PRUNE_EVERY_S = 60.0
STREAM_IDLE_S = 3600.0  # an empty tenant stream goes this long after its last entry was added

class Pruner:
    def __init__(self, redis: Redis, model: str, every_s: float = PRUNE_EVERY_S,
                 stream_idle_s: float = STREAM_IDLE_S) -> None:
        self.redis = redis
        self.store = JobStore(redis)
        self.model = model
        self.every_s = every_s
        self.stream_idle_s = stream_idle_s
        self._next = time.monotonic() + every_s

    def due(self) -> bool:
        return time.monotonic() >= self._next

    async def prune(self) -> tuple[int, int]:
        """One pass over the model's lanes; returns (streams removed, consumers removed)."""
        self._next = time.monotonic() + self.every_s
        live = set(await self.redis.smembers(keys.WORKERS_SET))
        if live:  # a worker in the set whose heartbeat key expired is gone
            beats = await mget(self.redis, [keys.worker_key(w) for w in sorted(live)])
            live = {w for w, beat in zip(sorted(live), beats, strict=True) if beat is not None}
        streams_removed = consumers_removed = 0
        for lane in keys.LANES:  # a few round trips a lane, whatever the number of tenants
            lane_set = keys.lane_tenants_key(self.model, lane)
            tenants = sorted(await self.redis.smembers(lane_set))
            if not tenants:
                continue
            streams = [keys.jobs_stream(self.model, lane, t) for t in tenants]
            gone = await self._prune_streams(lane_set, tenants, streams)
            kept = [s for s, g in zip(streams, gone, strict=True) if not g]
            streams_removed += len(streams) - len(kept)
            consumers_removed += await self._prune_consumers(kept, live)
        if streams_removed or consumers_removed:
            log.info("pruned the queue", model=self.model, streams=streams_removed, consumers=consumers_removed)
        return streams_removed, consumers_removed

    async def _prune_streams(self, lane_set: str, tenants: list[str], streams: list[str]) -> list:
        """1 where the stream went (jobstore's PRUNE_STREAM, atomic against submit)."""
        return await self.store.prune_streams(lane_set, tenants, streams, int(self.stream_idle_s * 1000))

    async def _prune_consumers(self, streams: list[str], live: set[str]) -> int:
        """Consumers with nothing pending whose worker is not alive. (A dead worker's pending entries are
        recovery's: they are claimed first, and the consumer goes on a later pass.)"""
        if not streams:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_consumers(stream, keys.GROUP)
        infos = await pipe.execute(raise_on_error=False)  # no group yet (never read): an error, skipped
        drop = self.redis.pipeline(transaction=False)
        for stream, consumers in zip(streams, infos, strict=True):
            if isinstance(consumers, Exception):
                continue
            for c in consumers:
                if c["pending"] == 0 and c["name"] not in live:
                    drop.xgroup_delconsumer(stream, keys.GROUP, c["name"])
        removed = len(drop)
        if removed:
            await drop.execute()
        return removed
