"""What every `tokenq` command that works on Redis alone shares: the URL it needs, one client for the
command's run, and a clear error instead of a traceback when Redis cannot be reached."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError

from jobstore.connect import AnyRedis, connect


def run_with_redis(redis_url: str | None, command: Callable[[AnyRedis], Awaitable[int]]) -> int:
    """`command(redis)`'s exit code, on a client of `redis_url` closed afterwards."""
    if not redis_url:
        raise SystemExit("error: --redis-url (or TOKENQ_REDIS_URL) is required")

    async def run() -> int:
        redis = connect(redis_url)
        try:
            return await command(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except RedisConnectionError as e:
        raise SystemExit(f"error: cannot reach Redis at {redis_url} ({e}); is `tokenq up` running?") from None
