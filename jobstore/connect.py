"""The one way every process opens Redis: a single node (`redis://`, `rediss://`, `unix://`), or a Redis
Cluster when the URL's scheme says so (`redis+cluster://host:port`, `rediss+cluster://...`: any one node's
address; the client finds the others and routes each command by its key's slot).

On a cluster a MULTI cannot span nodes and redis-py's cluster pipeline carries no scripts, so callers that
group commands ask `pipeline` here (a plain pipeline on a cluster: the commands still go in one round trip
per node) and the job store sends its scripts one by one (jobstore/runner.py)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster

AnyRedis = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def connect(url: str, max_connections: int | None = None, **options: Any) -> AnyRedis:
    """A client with decode_responses=True; `options` go to each connection (timeouts, retry, keepalive)."""
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        extra = {"max_connections": max_connections} if max_connections else {}
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", decode_responses=True, **extra,
                                     **options)
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
