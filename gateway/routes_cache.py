"""The caller's response-cache entries: DELETE /v1/cache/entries/{id} removes an answer (the entry a hit
names in its `x-tokenq-cache-entry` header and the job's `cache_entry`, and the same answer's other
entry), DELETE /v1/cache every one of the tenant's.
A wrong answer the cache keeps giving, or answers a new system prompt or model makes stale, then go at
once instead of at their TTL; every gateway's semantic index drops them as it follows the cache's log."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.context import Caller, get_caller, single_node_only
from gateway.errors import ApiError
from respcache import store
from respcache.keys import ENTRY_ID, ENTRY_ID_RULE

router = APIRouter(dependencies=[Depends(single_node_only)])


@router.delete("/v1/cache/entries/{entry_id}")
async def delete_entry(entry_id: str, caller: Caller = Depends(get_caller)) -> dict:
    if not ENTRY_ID.fullmatch(entry_id):
        raise ApiError(400, f"entry_id must be {ENTRY_ID_RULE} (got {entry_id!r})", param="entry_id")
    removed = await store.remove_answer(caller.ctx.redis, caller.tenant.name, entry_id)
    if entry_id not in removed:
        raise ApiError(404, f"no cache entry {entry_id!r} for this tenant", param="entry_id",
                       code="cache_entry_not_found")
    # `removed`: this entry and the same answer's other one (exact or semantic), which would go on answering
    return {"id": entry_id, "object": "cache.entry.deleted", "deleted": True, "removed": removed}


@router.delete("/v1/cache")
async def purge(caller: Caller = Depends(get_caller)) -> dict:
    return {"object": "cache.purged", "deleted": await store.purge(caller.ctx.redis, caller.tenant.name)}
