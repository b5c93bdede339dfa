"""The gateway's Redis client: retries with backoff, so that a Redis restart costs a few slow requests
instead of failed ones; once the retries are spent the request gets a 503 (see errors.py), never a 500.

Its pool is bounded: past MAX_CONNECTIONS a command waits for a free connection (up to POOL_WAIT_S, then
a 503), so a burst of requests cannot take a connection each and run Redis into `maxclients`. Submissions
share one pipelined connection (jobstore/pipe.py) and every job follower one pub/sub connection
(event_hub.py), so the pool serves only the other reads."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobstore.connect import AnyRedis, connect, is_cluster_url

RETRIES = 4  # 0.1 + 0.2 + 0.4 + 0.5 s of back-off (redis-py's first wait is base x 2) before a request gives up
CONNECT_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 12
POOL_WAIT_S = 5.0
# What a readiness probe or a metrics scrape waits for Redis: one that accepts connections and never answers
# (stopped with SIGSTOP, stuck behind a long script) must make /readyz say so, not hang it past the prober's
# own timeout (a prober that times out learns nothing of why), nor hang /metrics.
PROBE_TIMEOUT_S = 2.0


def make_redis(url: str) -> AnyRedis:
    """The gateway's client; for a cluster's URL (jobstore/connect.py) redis-py's cluster client, with at most
    MAX_CONNECTIONS commands in flight (it retries on a lost node and follows MOVED itself)."""
    if is_cluster_url(url):
        return connect(url, max_connections=MAX_CONNECTIONS, wait_s=POOL_WAIT_S,
                       socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, decode_responses=True,
        health_check_interval=30, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True,
    )
    return aioredis.Redis.from_pool(pool)
