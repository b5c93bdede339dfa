"""What every route needs, built once by the app's lifespan and found on `request.app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from gateway.admission import Admission
from gateway.auth import Authenticator, Tenant
from gateway.cancel import Canceller
from gateway.depth import DepthGauge
from gateway.metrics import GatewayMetrics
from gateway.redis_pipe import RedisPipe
from gateway.registry import Registry


@dataclass
class GatewayContext:
    redis: aioredis.Redis
    pipe: RedisPipe  # the submission path's commands (admission, submit): one shared, pipelined connection
    registry: Registry
    metrics: GatewayMetrics
    auth: Authenticator
    admission: Admission
    depth: DepthGauge
    canceller: Canceller

    @classmethod
    def build(cls, redis: aioredis.Redis, metrics: GatewayMetrics, max_queue_depth: int) -> GatewayContext:
        pipe = RedisPipe(redis)
        return cls(redis=redis, pipe=pipe, registry=Registry(redis), metrics=metrics, auth=Authenticator(redis),
                   admission=Admission(pipe), depth=DepthGauge(redis, max_queue_depth),
                   canceller=Canceller(redis))


async def get_ctx(request: Request) -> GatewayContext:
    return request.app.state.ctx


@dataclass(frozen=True)
class Caller:
    """The context and the authenticated tenant of one /v1 request (one dependency: each costs time)."""

    ctx: GatewayContext
    tenant: Tenant


async def get_caller(request: Request) -> Caller:
    ctx: GatewayContext = request.app.state.ctx
    return Caller(ctx, await ctx.auth.authenticate(request.headers.get("authorization")))
