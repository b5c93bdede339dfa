"""What every route needs, built once by the app's lifespan and found on `request.app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from gateway.auth import Authenticator, Tenant
from gateway.cancel import Canceller
from gateway.errors import ApiError
from gateway.event_hub import Hub, event_hub
from gateway.metrics import GatewayMetrics
from gateway.redis_client import CONNECT_TIMEOUT_S, RETRIES
from gateway.registry import Registry
from gateway.response_cache import ResponseCache
from jobstore import JobStore
from jobstore.connect import AnyRedis, is_cluster
from jobstore.pipe import RedisPipe


@dataclass
class GatewayContext:
    redis: AnyRedis
    pipe: RedisPipe  # the submission script's connection: one shared, pipelined connection
    store: JobStore
    registry: Registry
    metrics: GatewayMetrics
    auth: Authenticator
    canceller: Canceller
    max_queue_depth: int  # per model and lane, shared fairly by the tenants with jobs in it (0: none)
    hub: Hub  # every follower of a job (waiting or streaming) on one pub/sub connection
    cache: ResponseCache

    @classmethod
    def build(cls, redis: AnyRedis, metrics: GatewayMetrics, max_queue_depth: int,
              library_path: bool = False) -> GatewayContext:
        pipe = RedisPipe(redis, RETRIES, CONNECT_TIMEOUT_S, library=library_path)
        store = JobStore(redis, scripts=None if is_cluster(redis) else pipe, on_ended=metrics.job_ended)
        return cls(redis=redis, pipe=pipe, store=store, registry=Registry(redis), metrics=metrics,
                   auth=Authenticator(redis), canceller=Canceller(store), max_queue_depth=max_queue_depth,
                   hub=event_hub(redis),
                   cache=ResponseCache(redis, metrics.cache_lookups, metrics.cache_hits, metrics.semantic_entries,
                                         metrics.semantic_loading))


async def get_ctx(request: Request) -> GatewayContext:
    return request.app.state.ctx


async def single_node_only(request: Request) -> None:
    """Files, batches and the response cache keep keys that are not laid out for a Redis Cluster yet: a 501
    there."""
    if is_cluster(request.app.state.ctx.redis):
        raise ApiError(501, "files, batches and the response cache need a single-node Redis; this gateway runs on "
                            "a Redis Cluster",
                       code="not_on_cluster")


@dataclass(frozen=True)
class Caller:
    """The context and the authenticated tenant of one /v1 request (one dependency: each costs time)."""

    ctx: GatewayContext
    tenant: Tenant


async def get_caller(request: Request) -> Caller:
    ctx: GatewayContext = request.app.state.ctx
    return Caller(ctx, await ctx.auth.authenticate(request.headers.get("authorization")))
