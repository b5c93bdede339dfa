"""OpenAI's Batch API: POST/GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. The
lines run as jobs in the batch lane, fed by `tokenq batches` (batches/feeder.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from batches.settings import BatchSettings
from batches.store import batch_object, cancel_batch, create_batch, list_batches, read_batch
from gateway.context import Caller, get_caller, single_node_only
from gateway.responses import list_page
from gateway.routes_files import batch_settings, expiry_refused
from gateway.schemas import Metadata
from protocol.text import Text

router = APIRouter(dependencies=[Depends(single_node_only)])


class BatchCreate(BaseModel):
    input_file_id: Text
    endpoint: Text
    completion_window: Text = "24h"
    metadata: Metadata | None = None
    output_expires_after: Any = None  # OpenAI's: refused, not ignored (post_batch)


@router.post("/v1/batches")
async def post_batch(body: BatchCreate, caller: Caller = Depends(get_caller),
                     settings: BatchSettings = Depends(batch_settings)) -> dict:
    if body.output_expires_after is not None:
        raise expiry_refused("output_expires_after", "the output files'", settings)
    record = await create_batch(caller.ctx.redis, caller.tenant.name, body.input_file_id, body.endpoint,
                                body.completion_window, body.metadata, settings.batch_retention_s)
    return batch_object(record)


@router.get("/v1/batches")
async def get_batches(caller: Caller = Depends(get_caller), limit: int = Query(default=20, ge=1, le=100),
                      after: str | None = None) -> dict:
    page, more = await list_batches(caller.ctx.redis, caller.tenant.name, limit, after)
    return list_page([batch_object(b) for b in page], more)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, caller: Caller = Depends(get_caller)) -> dict:
    return batch_object(await read_batch(caller.ctx.redis, batch_id, caller.tenant.name))


@router.post("/v1/batches/{batch_id}/cancel")
async def post_cancel(batch_id: str, caller: Caller = Depends(get_caller)) -> dict:
    return batch_object(await cancel_batch(caller.ctx.redis, batch_id, caller.tenant.name))
