"""The caller's response-cache entries: DELETE /v1/cache/entries/{id} removes one (the id a hit names in
its `x-tokenq-cache-entry` header and the job's `cache_entry`), DELETE /v1/cache every one of the tenant's.
A wrong answer the cache keeps giving, or answers a new system prompt or model makes stale, then go at
once instead of at their TTL; every gateway's semantic index drops them as it follows the cache's log."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends

from gateway.context import Caller, get_caller, single_node_only
from gateway.errors import ApiError
from respcache import store

router = APIRouter(dependencies=[Depends(single_node_only)])
_ENTRY_ID = re.compile(r"[xs]:[0-9a-f]{64}")


@router.delete("/v1/cache/entries/{entry_id}")
async def delete_entry(entry_id: str, caller: Caller = Depends(get_caller)) -> dict:
    if not _ENTRY_ID.fullmatch(entry_id):
        raise ApiError(400, f"entry_id must be 'x:' or 's:' and 64 hex digits, as a hit's x-tokenq-cache-entry "
                            f"header gives it (got {entry_id!r})", param="entry_id")
    if not await store.remove(caller.ctx.redis, caller.tenant.name, [entry_id]):
        raise ApiError(404, f"no cache entry {entry_id!r} for this tenant", param="entry_id",
                       code="cache_entry_not_found")
    return {"id": entry_id, "object": "cache.entry.deleted", "deleted": True}


@router.delete("/v1/cache")
async def purge(caller: Caller = Depends(get_caller)) -> dict:
    return {"object": "cache.purged", "deleted": await store.purge(caller.ctx.redis, caller.tenant.name)}
