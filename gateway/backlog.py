"""What waits in the lanes, read from Redis alone: per (model, lane, tenant) stream, the jobs no worker has
taken yet, the ones being run, and the age of the oldest waiting one. Given the live workers, a job taken by
a worker that is gone (handed back at its stop, or left by a crash until its lease lapses) waits too: no
worker runs it, and the next to look takes it.

It needs no live worker, so that the gateway can export the backlog that wakes a scaled-to-zero worker
pool (KEDA) and fires the no-worker alert, and `tokenq status` can show it."""

from __future__ import annotations

import math
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
    waiting: int  # entries after the group's last delivered id, or held by a worker that is gone
    running: int  # delivered to a live worker and not yet acknowledged
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
                       known_lanes: list[tuple[str, str]] | None = None,
                       live: set[str] | None = None) -> list[StreamBacklog]:
    """One entry per tenant stream of every lane (a decode_responses client); known_lanes saves the SCAN.
    `live`: the ids of the workers whose heartbeat is current (None: every holder counts as running)."""
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
    orphans = await _held_by_the_gone(redis, [s for *_, s in streams], counts, live)
    out = []
    for (model, lane, tenant, _), (length, pending, _), first, (held, held_since) in zip(
            streams, counts, firsts, orphans, strict=True):
        # Workers delete what they acknowledge, so every entry left is either pending or waiting.
        unread = max(0, length - pending)
        since = min(_entry_time(first[0][0]) if unread and isinstance(first, list) and first else math.inf,
                    held_since)
        out.append(StreamBacklog(model, lane, tenant, unread + held, pending - held,
                                 max(0.0, now - since) if since < math.inf else 0.0))
    return out


async def _held_by_the_gone(redis: aioredis.Redis, streams: list[str], counts: list[tuple[int, int, str]],
                            live: set[str] | None) -> list[tuple[int, float]]:
    """Per stream, the entries pending with consumers that are not live workers, and the time of the oldest
    (inf when there are none)."""
    held = [(0, math.inf)] * len(streams)
    busy = [i for i, (_, pending, _) in enumerate(counts) if pending]
    if live is None or not busy:
        return held
    async with redis.pipeline(transaction=False) as pipe:
        for i in busy:
            pipe.xinfo_consumers(streams[i], keys.GROUP)
        replies = await pipe.execute(raise_on_error=False)
    gone = [(i, c["name"], int(c["pending"])) for i, consumers in zip(busy, replies, strict=True)
            if isinstance(consumers, list) for c in consumers if int(c.get("pending", 0)) and c["name"] not in live]
    if not gone:
        return held
    async with redis.pipeline(transaction=False) as pipe:
        for i, name, _ in gone:
            pipe.xpending_range(streams[i], keys.GROUP, min="-", max="+", count=1, consumername=name)
        oldest = await pipe.execute(raise_on_error=False)
    for (i, _, pending), first in zip(gone, oldest, strict=True):
        n, since = held[i]
        if isinstance(first, list) and first:
            since = min(since, _entry_time(first[0]["message_id"]))
        held[i] = (n + pending, since)
    return held
