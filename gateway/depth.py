"""Queue depth per (model, lane): the entries on the lane's streams (queued jobs and the ones being run),
summed over its tenants' streams. Read at most every `CACHE_S` per lane, so the limit is soft by the
jobs one gateway admits in that time, and the hot path mostly costs nothing: an older figure (up to
`STALE_S` more) answers while a read in the background refreshes it."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from gateway.errors import ApiError
from gateway.flight import TtlCache
from gateway.jobs import lane_streams

CACHE_S = 0.25
STALE_S = 5.0  # past CACHE_S, the last figure still answers while a background read refreshes it
DEFAULT_MAX_QUEUE_DEPTH = 100_000
MAX_QUEUE_DEPTH_ENV = "TOKENQ_MAX_QUEUE_DEPTH"


def max_queue_depth_from_env() -> int:
    return int(os.environ.get(MAX_QUEUE_DEPTH_ENV) or DEFAULT_MAX_QUEUE_DEPTH)


class DepthGauge:
    def __init__(self, redis: aioredis.Redis, max_depth: int, cache_s: float = CACHE_S,
                 stale_s: float = STALE_S) -> None:
        self.redis = redis
        self.max_depth = max_depth
        self.cache_s = cache_s
        self.stale_s = stale_s
        self._cache = TtlCache()

    async def depth(self, model: str, lane: str) -> int:
        return await self._cache.get((model, lane), lambda: self._read(model, lane), self.cache_s,
                                     self.stale_s)

    async def _read(self, model: str, lane: str) -> int:
        streams = await lane_streams(self.redis, model, lane)
        depth = 0
        if streams:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xlen(stream)
                depth = sum(await pipe.execute())
        return depth

    async def check(self, model: str, lane: str) -> None:
        """429 when the lane is full (the caller has already made sure a worker is alive, else 503)."""
        if self.max_depth <= 0:
            return
        depth = await self.depth(model, lane)
        if depth >= self.max_depth:
            raise ApiError(429, f"the {lane!r} lane of model {model!r} is full (max queue depth "
                                f"{self.max_depth}, {depth} jobs waiting); try again later",
                           code="queue_full", type_="queue_depth", headers={"Retry-After": "1"})
