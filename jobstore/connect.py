"""The one way every process opens Redis: a single node (`redis://`, `rediss://`, `unix://`), or a Redis
Cluster when the URL's scheme says so (`redis+cluster://host:port`, `rediss+cluster://...`: any one node's
address; the client finds the others and routes each command by its key's slot).

On a cluster a MULTI cannot span nodes and redis-py's cluster pipeline carries no scripts, so callers that
group commands ask `pipeline` here (a plain pipeline on a cluster: the commands still go in one round trip
per node) and the job store sends its scripts one by one (jobstore/runner.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

AnyRedis = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


class BoundedCluster(RedisCluster):
    """A cluster client with at most `limit` commands (or pipelines) in flight, each waiting up to `wait_s`
    for its turn: as a single node's BlockingConnectionPool does. redis-py's cluster client would raise
    MaxConnectionsError at once past its per-node limit; with at most `limit` in flight, no node needs more
    than `limit` connections."""

    def __init__(self, *args: Any, limit: int, wait_s: float, **kwargs: Any) -> None:
        super().__init__(*args, max_connections=limit, **kwargs)
        self._room = asyncio.Semaphore(limit)
        self._wait_s = wait_s

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._room.acquire()
        except TimeoutError:
            raise RedisConnectionError(f"no free Redis Cluster connection within {self._wait_s} s") from None
        try:
            yield
        finally:
            self._room.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises as redis-py does
        return _BoundedPipeline(self)


class _BoundedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self._client.turn():
            return await super().execute(raise_on_error, allow_redirections)


def connect(url: str, max_connections: int | None = None, wait_s: float | None = None,
            **options: Any) -> AnyRedis:
    """A client with decode_responses=True; `options` go to each connection (timeouts, retry, keepalive).
    On a cluster, `max_connections` bounds the commands in flight (each waits up to `wait_s` for its turn)."""
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        address = f"{CLUSTER_SCHEMES[scheme]}://{rest}"
        if max_connections:
            return BoundedCluster.from_url(address, decode_responses=True, limit=max_connections,
                                           wait_s=wait_s or 5.0, **options)
        return RedisCluster.from_url(address, decode_responses=True, **options)
    if max_connections:
        options["max_connections"] = max_connections
    return aioredis.from_url(url, decode_responses=True, **options)


async def mget(redis: AnyRedis, names: list[str]) -> list[str | None]:
    """MGET of keys that may lie in different slots (on a cluster: one MGET per slot, not atomic)."""
    if is_cluster(redis):
        return await redis.mget_nonatomic(names)
    return await redis.mget(names)


def pipeline(redis: AnyRedis, transaction: bool = True) -> Pipeline | ClusterPipeline:
    """A pipeline that is a MULTI on a single node; on a cluster its commands are sent together, not
    atomically (use it where a MULTI only saves round trips, or where each key's own command suffices)."""
    if is_cluster(redis):
        return redis.pipeline()
    return redis.pipeline(transaction=transaction)
