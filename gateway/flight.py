"""Cached Redis reads for the hot path. Single flight: the requests that find one cache entry stale at the
same moment share one Redis read. At thousands of requests a second dozens are in flight when an entry
expires, and each would otherwise read (and parse) the same thing; the model card is megabytes.

Stale while revalidate: where a value may lag a little (queue depth, tenant limits, live workers), an
expired entry is still served while one read refreshes it in the background. At low load every entry has
expired by the next request, and its reads would otherwise sit on that request's time to first token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from tokenq.logs import detached

T = TypeVar("T")


def _now() -> float:
    return time.monotonic()


class SingleFlight:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future] = {}

    def start(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> asyncio.Future:
        """The read of `key` in flight, started now if none is (shared by requests, and run in none of theirs)."""
        future = self._running.get(key)
        if future is None:
            future = detached(fetch())
            self._running[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        return future

    async def run(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """`fetch()`'s result; callers with the same key while one runs get that one's result (or error)."""
        return await asyncio.shield(self.start(key, fetch))  # one caller cancelled does not cancel the others

    def refresh(self, key: Hashable, fetch: Callable[[], Awaitable[T]],
                on_result: Callable[[T], None] | None = None) -> None:
        """Start a background read of `key` unless one is in flight; `on_result` gets its value. A failed
        read changes nothing (and is taken here, so asyncio does not report it as never retrieved)."""
        if key in self._running:
            return

        def done(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            if on_result is not None:
                on_result(future.result())

        self.start(key, fetch).add_done_callback(done)

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

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float, stale: float = 0.0) -> T:
        """The value read at most `ttl` ago; or, up to `ttl + stale` old, the cached one while a background
        read refreshes it; else a read now."""
        now = _now()
        hit = self._values.get(key)
        if hit is not None:
            age = now - hit[1]
            if age < ttl:
                return hit[0]
            if age < ttl + stale:
                self._flight.refresh(key, fetch, lambda value: self._store(key, value, now))
                return hit[0]
        value = await self._flight.run(key, fetch)
        self._store(key, value, now)
        return value

    async def renew(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """A read of `key` now (or the one in flight), kept: for a caller that keeps an entry from expiring
        where a request would otherwise wait for its read."""
        now = _now()
        value = await self._flight.run(key, fetch)
        self._store(key, value, now)
        return value

    def _store(self, key: Hashable, value: Any, read_at: float) -> None:
        if len(self._values) >= self.max_entries:
            self._values.clear()
        self._values[key] = (value, read_at)
