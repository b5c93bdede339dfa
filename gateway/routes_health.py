"""Models, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.context import Caller, GatewayContext, get_caller, get_ctx
from gateway.errors import ApiError
from gateway.redis_client import PROBE_TIMEOUT_S
from protocol import keys
from protocol.outage import is_redis_oom
from protocol.workers import WorkerHeartbeat
from tokenq.logs import get_logger

router = APIRouter()
log = get_logger(__name__)
READY_PROBE = f"{keys.PREFIX}:gateway:ready-probe"


async def _model_card(ctx: GatewayContext, name: str, workers: list[WorkerHeartbeat]) -> dict:
    """`created` is when the model's card was written (its worker started), not a heartbeat's time: a model
    object reads the same from one request to the next."""
    builder = await ctx.registry.prompt_builder(name)
    return {
        "id": name,
        "object": "model",
        "created": builder.card.created if builder is not None else int(min(w.at for w in workers)),
        "owned_by": "tokenq",
        "max_model_len": max(w.max_model_len for w in workers),
        "workers": len(workers),
    }


async def _idle_model_card(ctx: GatewayContext, name: str) -> dict | None:
    """A model that workers have served and none serves now: it is accepted, its jobs wait."""
    builder = await ctx.registry.prompt_builder(name)
    if builder is None:
        return None
    card = builder.card
    return {"id": name, "object": "model", "created": card.created, "owned_by": "tokenq",
            "max_model_len": card.max_model_len, "workers": 0}


@router.get("/v1/models")
async def list_models(caller: Caller = Depends(get_caller)) -> dict:
    ctx = caller.ctx
    models = await ctx.registry.models()
    data = [await _model_card(ctx, name, ws) for name, ws in sorted(models.items())]
    for name in sorted(await ctx.store.known_models() - set(models)):
        if (card := await _idle_model_card(ctx, name)) is not None:
            data.append(card)
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")  # a served name may hold slashes ("HuggingFaceTB/SmolLM2-135M")
async def get_model(model: str, caller: Caller = Depends(get_caller)) -> dict:
    ctx = caller.ctx
    workers = (await ctx.registry.models()).get(model)
    if workers:
        return await _model_card(ctx, model, workers)
    card = await _idle_model_card(ctx, model) if model in await ctx.store.known_models() else None
    if card is None:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return card


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: GatewayContext = Depends(get_ctx)) -> Response:
    """Anyone may ask, so the answer is a status and a short reason code: the Redis address and its
    error text go to the log only."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            # A write, not a PING: a Redis at maxmemory answers PING and refuses every job.
            await ctx.redis.set(READY_PROBE, "1", ex=60)
            # Not a worker: jobs of a model that workers have served wait in the queue while none is live.
            workers = await ctx.registry.live_workers()
    except Exception as e:  # any failure to reach Redis (a timeout too) means: not ready
        if is_redis_oom(e):  # maxmemory reached: jobs are refused until memory is freed
            log.warning("not ready: redis out of memory", error=repr(e))
            return JSONResponse({"status": "not ready", "reason": "redis_oom"}, status_code=503)
        log.warning("not ready: redis unavailable", error=repr(e))
        return JSONResponse({"status": "not ready", "reason": "redis_unavailable"}, status_code=503)
    return JSONResponse({"status": "ready", "workers": len(workers),
                         "models": sorted({w.model for w in workers})})


# Health checkers that send HEAD (a 405 read as down); undocumented, as HEAD answers what GET does.
for _path, _endpoint in (("/healthz", healthz), ("/readyz", readyz), ("/v1/models", list_models)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, ctx: GatewayContext = Depends(get_ctx)) -> Response:
    """Open, unless a token is set (TOKENQ_METRICS_TOKEN, or TOKENQ_METRICS_TOKEN_FILE: gateway/metrics_token.py):
    its series name tenants and their traffic, so a gateway whose port is public asks Prometheus for that token
    (`authorization` in its scrape config)."""
    token = request.app.state.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "/metrics asks for its token, TOKENQ_METRICS_TOKEN or the one in the file "
                                "TOKENQ_METRICS_TOKEN_FILE names (Authorization: Bearer ...)",
                           code="invalid_metrics_token")
    return await ctx.metrics.scrape(ctx.redis, ctx.registry)
