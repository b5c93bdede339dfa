"""Cached Redis reads for the hot path. Single flight: the requests that find one cache entry stale at the
same moment share one Redis read. At thousands of requests a second dozens are in flight when an entry
expires, and each would otherwise read (and parse) the same thing; the model card is megabytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future] = {}

    async def run(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """`fetch()`'s result; callers with the same key while one runs get that one's result (or error)."""
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(fetch())
            self._running[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(future)  # one caller cancelled does not cancel the others' read

    def _forget(self, key: Hashable, done: asyncio.Future) -> None:
        if self._running.get(key) is done:
            del self._running[key]


class TtlCache:
    """Values trusted for `ttl` seconds after they were read; concurrent misses of one key share one read.
    Bounded: past `max_entries` it starts over (every entry is one read away)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._values: dict[Hashable, tuple[Any, float]] = {}
        self._flight = SingleFlight()

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float) -> T:
        now = time.monotonic()
        hit = self._values.get(key)
        if hit is not None and now - hit[1] < ttl:
            return hit[0]
        value = await self._flight.run(key, fetch)
        if len(self._values) >= self.max_entries:
            self._values.clear()
        self._values[key] = (value, now)
        return value
