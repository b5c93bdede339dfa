"""Models, health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from gateway.context import Caller, GatewayContext, get_caller, get_ctx
from gateway.errors import ApiError
from protocol.workers import WorkerHeartbeat

router = APIRouter()


def _model_card(name: str, workers: list[WorkerHeartbeat]) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": int(min(w.at for w in workers)),
        "owned_by": "tokenq",
        "max_model_len": max(w.max_model_len for w in workers),
        "workers": len(workers),
    }


@router.get("/v1/models")
async def list_models(caller: Caller = Depends(get_caller)) -> dict:
    models = await caller.ctx.registry.models()
    return {"object": "list", "data": [_model_card(name, ws) for name, ws in sorted(models.items())]}


@router.get("/v1/models/{model}")
async def get_model(model: str, caller: Caller = Depends(get_caller)) -> dict:
    workers = (await caller.ctx.registry.models()).get(model)
    if not workers:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return _model_card(model, workers)


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: GatewayContext = Depends(get_ctx)) -> Response:
    try:
        await ctx.redis.ping()
    except Exception as e:  # any failure to reach Redis means: not ready
        return JSONResponse({"status": "not ready", "reason": f"redis: {e}"}, status_code=503)
    workers = await ctx.registry.live_workers()
    if not workers:
        return JSONResponse({"status": "not ready", "reason": "no live worker"}, status_code=503)
    return JSONResponse({"status": "ready", "workers": len(workers),
                         "models": sorted({w.model for w in workers})})


@router.get("/metrics", include_in_schema=False)
async def metrics(ctx: GatewayContext = Depends(get_ctx)) -> Response:
    return ctx.metrics.render()
