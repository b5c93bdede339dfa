"""A lost Redis, as every long-running process handles it: one warning when the outage starts, one
line when it ends, and an exponential back-off between attempts in between (a restart of Redis is a
pause, not a crash, and a log that repeats every retry hides everything else). A Redis that answers but
refuses the password (changed under a running role) is retried the same way, for a rotation may be under
way, but said as what it is: an error naming the password, not a warning that Redis is away. A Redis that is
full (maxmemory reached, nothing to evict) answers reads and refuses writes; a loop whose write it refuses
waits the same way, with its own line (`is_redis_oom`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    OutOfMemoryError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What redis-py raises for a Redis that is unreachable, restarting or still loading (BusyLoadingError is a
# ConnectionError), or for a cluster with a node down or a slot moving (ClusterDownError and TryAgainError
# are ResponseErrors, but a wait cures them as it cures an outage). A request that meets one is answered
# 503, not 500; a loop that meets one backs off and retries.
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ClusterDownError, TryAgainError)
# The same for a loop, whose own socket calls may raise OSError too.
REDIS_DOWN = (*REDIS_AWAY, OSError)
T = TypeVar("T")


def is_redis_oom(exc: BaseException) -> bool:
    """Redis refused a write: maxmemory is reached and nothing can be evicted (a script's write refused
    mid-run comes back as a plain error whose text says so). Reads still work; a loop whose write is refused
    backs off and retries, as in an outage, for freeing memory cures it."""
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and "OOM command not allowed"
                                                 in str(exc))


def waits_out(exc: BaseException) -> bool:
    """Whether a loop backs off and retries after `exc`: Redis away, or full and refusing writes."""
    return isinstance(exc, REDIS_DOWN) or is_redis_oom(exc)


class Outage:
    """`lost(error)` on each failure returns how long to wait before the next attempt; `restored()` on
    the first success after it. `log` is a structlog logger; `what` names the loop in both lines."""

    def __init__(self, log: Any, what: str, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.log = log
        self.what = what
        self.base_s = base_s
        self.cap_s = cap_s
        self.since: float | None = None
        self._delay = base_s
        self._refused = ""  # what refused the latest attempt: "password", "oom" (Redis full), or "" (an outage)

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def lost(self, error: BaseException) -> float:
        refused = "password" if isinstance(error, AuthenticationError) else "oom" if is_redis_oom(error) else ""
        if self.since is None:
            self.since = time.monotonic()
            self._delay = self.base_s
        elif refused == self._refused:
            return self._next_delay()
        self._refused = refused
        if refused == "password":
            self.log.error("redis refused the password; retrying with back-off (the URL's password is wrong "
                           "or was changed)", loop=self.what, error=repr(error))
        elif refused == "oom":
            self.log.error("redis is out of memory and refuses writes; retrying with back-off (raise its "
                           "maxmemory or free memory)", loop=self.what, error=repr(error))
        else:
            self.log.warning("redis unreachable; retrying with back-off", loop=self.what, error=repr(error))
        return self._next_delay()

    def _next_delay(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.cap_s)
        return delay

    async def wait_out(self, error: BaseException, stop: asyncio.Event) -> None:
        """The back-off after `error` (see lost), cut short when `stop` is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.lost(error))

    def restored(self) -> None:
        if self.since is not None:
            event = "redis accepts writes again" if self._refused == "oom" else "redis reachable again"
            self.log.info(event, loop=self.what, down_s=round(time.monotonic() - self.since, 1))
            self.since = None


async def once_reachable(attempt: Callable[[], Awaitable[T]], outage: Outage, stop: asyncio.Event) -> T | None:
    """`attempt()`'s result, retried with `outage`'s back-off while Redis is away; None if `stop` is set
    first. A process that starts while Redis is away waits for it, as it rides out a later outage; a
    refused password is no outage, and raises."""
    while not stop.is_set():
        try:
            result = await attempt()
        except AuthenticationError:
            raise
        except REDIS_DOWN as e:
            await outage.wait_out(e, stop)
            continue
        outage.restored()
        return result
    return None
