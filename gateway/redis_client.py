"""The gateway's Redis client: retries with backoff, so that a Redis restart costs a few slow requests
instead of failed ones; once the retries are spent the request gets a 503 (see errors.py), never a 500."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

RETRIES = 4  # about 0.05 + 0.1 + 0.2 + 0.4 s of back-off before a request gives up
CONNECT_TIMEOUT_S = 1.0


def make_redis(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url, decode_responses=True, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True,
    )
