"""The gateway's ASGI app: `create_app(redis_url)`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from batches.settings import BatchSettings
from gateway import (
    routes_batches,
    routes_cache,
    routes_files,
    routes_health,
    routes_jobs,
    routes_openai,
    stopping,
)
from gateway.access_log import logged
from gateway.admission import max_queue_depth_from_env
from gateway.context import GatewayContext
from gateway.errors import UnhandledErrors, install_error_handlers
from gateway.fastpath import FastSubmit, is_fast_submission
from gateway.limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimitMiddleware
from gateway.metrics import GatewayMetrics, MetricsMiddleware, mark_process_gone
from gateway.metrics_token import metrics_token
from gateway.openapi import install_openapi
from gateway.redis_client import make_redis
from gateway.warmup import keep_warm, warm_before_serving
from jobstore.expiry import sweep_forever
from protocol.hot_loop import HotLoop
from tokenq.logs import configure_logging
from tokenq.settings import Settings


class GatewayApp(FastAPI):
    """FastAPI, with the submitting routes answered first by gateway/fastpath.py."""

    fast_submit: FastSubmit | None = None
    access_log: bool = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.access_log and scope["type"] == "http":
            await logged(self._dispatch, scope, receive, send)
        else:
            await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_submit is not None and is_fast_submission(scope):
            await self.fast_submit(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(redis_url: str, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_queue_depth: int | None = None, library_path: bool | None = None) -> GatewayApp:
    configure_logging("gateway")
    settings = Settings.from_env()
    # The submission path of FastAPI and redis-py alone, without gateway/fastpath.py and jobstore/pipe.py:
    # `tokenq bench queue` runs both to show what the hand-written pieces buy.
    library = settings.gateway_library_path if library_path is None else library_path
    metrics = GatewayMetrics()
    depth = max_queue_depth_from_env() if max_queue_depth is None else max_queue_depth

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One shared client (and pool) for the process; every job follower shares the event hub's connection.
        redis = make_redis(redis_url)
        app.state.ctx = GatewayContext.build(redis, metrics, depth, library_path=library)
        await warm_before_serving(app.state.ctx)
        unwatch = stopping.watch(asyncio.get_running_loop())  # uvicorn's signal handlers are in place by now
        background = [asyncio.create_task(keep_warm(app.state.ctx)),
                      asyncio.create_task(sweep_forever(app.state.ctx.store))]  # jobs past their deadline
        if settings.hot_loop:  # poll while a client follows a job
            hub = app.state.ctx.hub
            hot = HotLoop(lambda: hub.channels > 0)
            hub.on_join = hot.poke
            background.append(asyncio.create_task(hot.run(), name="hot-loop"))
        try:
            yield
        finally:
            unwatch()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await app.state.ctx.canceller.settle(stopping.CANCEL_SETTLE_S)
            await app.state.ctx.hub.aclose()
            await app.state.ctx.cache.aclose()
            await app.state.ctx.pipe.aclose()
            await redis.aclose()
            mark_process_gone()

    app = GatewayApp(title="tokenq gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_jobs.router)
    app.state.metrics_token = metrics_token(settings.metrics_token, settings.metrics_token_file)
    app.state.batch_settings = BatchSettings.from_env()  # read at start: a bad value stops it, naming the variable
    app.include_router(routes_files.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_cache.router)
    app.include_router(routes_health.router)
    install_openapi(app)
    # Added last = outermost: metrics see every answer, the 413s of the size limit and the 500s included.
    app.add_middleware(UnhandledErrors)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.access_log = settings.access_log
    if library:
        return app
    app.fast_submit = FastSubmit(lambda s, r, se: FastAPI.__call__(app, s, r, se), lambda: app.state.ctx, metrics,
                                 max_body_bytes)
    return app
