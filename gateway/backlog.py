"""What waits in the lanes, read from Redis alone: per (model, lane, tenant) stream, the jobs no worker has
taken yet, the ones being run, and the age of the oldest waiting one.

It needs no live worker, so that the gateway can export the backlog that wakes a scaled-to-zero worker
pool (KEDA) and fires the no-worker alert, and `tokenq status` can show it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from protocol import keys

_LANE_SETS = f"{keys.PREFIX}:{{*}}:lane:*:tenants"  # keys.lane_tenants_key of every model and lane
_LANE_SET_SUFFIX = ":tenants"


@dataclass(frozen=True)
class StreamBacklog:
    model: str
    lane: str
    tenant: str
    waiting: int  # entries after the group's last delivered id: taken by no worker yet
    running: int  # delivered and not yet acknowledged
    oldest_waiting_s: float  # 0 when nothing waits


def _entry_time(entry_id: str) -> float:
    return int(entry_id.split("-", 1)[0]) / 1000.0


async def lanes(redis: aioredis.Redis) -> list[tuple[str, str]]:
    """Every (model, lane) a job was ever queued on: the lanes' tenant sets that submit maintains."""
    found = set()
    async for key in redis.scan_iter(match=_LANE_SETS, count=1000):
        model, _, lane = key.partition(":lane:")[2].removesuffix(_LANE_SET_SUFFIX).rpartition(":")
        if model and lane in keys.LANES:
            found.add((model, lane))
    return sorted(found)


async def read_backlog(redis: aioredis.Redis, now: float | None = None,
                       known_lanes: list[tuple[str, str]] | None = None) -> list[StreamBacklog]:
    """One entry per tenant stream of every lane (a decode_responses client); known_lanes saves the SCAN."""
    now = time.time() if now is None else now
    streams: list[tuple[str, str, str, str]] = []
    for model, lane in known_lanes if known_lanes is not None else await lanes(redis):
        for tenant in sorted(await redis.smembers(keys.lane_tenants_key(model, lane))):
            streams.append((model, lane, tenant, keys.jobs_stream(model, lane, tenant)))
    if not streams:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for *_, stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    counts: list[tuple[int, int, str]] = []  # (length, pending, first id a worker has not read)
    for i in range(len(streams)):
        length, groups = replies[2 * i], replies[2 * i + 1]
        length = length if isinstance(length, int) else 0
        group = next((g for g in groups if g.get("name") == keys.GROUP), None) if isinstance(groups, list) else None
        pending = int(group["pending"]) if group else 0
        counts.append((length, pending, f"({group['last-delivered-id']}" if group else "-"))
    async with redis.pipeline(transaction=False) as pipe:
        for (*_, stream), (_, _, start) in zip(streams, counts, strict=True):
            pipe.xrange(stream, min=start, count=1)
        firsts = await pipe.execute(raise_on_error=False)
    out = []
    for (model, lane, tenant, _), (length, pending, _), first in zip(streams, counts, firsts, strict=True):
        # Workers delete what they acknowledge, so every entry left is either pending or waiting.
        waiting = max(0, length - pending)
        oldest = max(0.0, now - _entry_time(first[0][0])) if waiting and isinstance(first, list) and first else 0.0
        out.append(StreamBacklog(model, lane, tenant, waiting, pending, oldest))
    return out
