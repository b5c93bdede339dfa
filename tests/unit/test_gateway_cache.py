"""The gateway's cached reads: fresh within ttl, served stale while one background read renews them, read
in line once too old; concurrent misses share one read; a failed background read keeps the old value."""

from __future__ import annotations

import asyncio

import pytest

from gateway import flight
from gateway.flight import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(flight, "_now", c)  # the cache's clock only: asyncio keeps the real one
    return c


class Source:
    """A fetch that counts its calls and answers the current value after a short wait."""

    def __init__(self) -> None:
        self.value = 1
        self.calls = 0
        self.fail = False

    async def fetch(self) -> int:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.fail:
            raise ConnectionError("redis away")
        return self.value


async def test_fresh_then_stale_then_renewed(clock):
    cache, src = TtlCache(), Source()
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1 and src.calls == 1
    src.value = 2
    clock.now += 0.5
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1 and src.calls == 1  # fresh
    clock.now += 1.0
    # Expired but within the stale window: the old value at once, one read started behind it.
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1
    await asyncio.sleep(0)  # let the background read begin
    assert src.calls == 2
    await asyncio.sleep(0.05)
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 2 and src.calls == 2


async def test_too_old_or_no_stale_window_reads_in_line(clock):
    cache, src = TtlCache(), Source()
    await cache.get("k", src.fetch, ttl=1.0)
    src.value = 2
    clock.now += 1.5
    assert await cache.get("k", src.fetch, ttl=1.0) == 2  # stale=0: no stale answers
    src.value = 3
    clock.now += 10.0
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 3  # past ttl + stale


async def test_failed_background_read_keeps_the_old_value(clock):
    cache, src = TtlCache(), Source()
    await cache.get("k", src.fetch, ttl=1.0, stale=5.0)
    src.fail = True
    clock.now += 2.0
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1
    await asyncio.sleep(0.05)
    assert await cache.get("k", src.fetch, ttl=1.0, stale=5.0) == 1
    await asyncio.sleep(0)
    assert src.calls == 3  # the failure kept the old value, still stale: read again
    clock.now += 10.0
    with pytest.raises(ConnectionError):
        await cache.get("k", src.fetch, ttl=1.0, stale=5.0)


async def test_concurrent_misses_share_one_read(clock):
    cache, src = TtlCache(), Source()
    got = await asyncio.gather(*(cache.get("k", src.fetch, ttl=1.0) for _ in range(20)))
    assert got == [1] * 20 and src.calls == 1
