"""Batch records: creation (checked against its input file), the OpenAI Batch object, listing, cancel."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from batches import keys as K
from batches.files import read_file
from batches.lines import ENDPOINTS
from batches.pages import read_page
from gateway.errors import ApiError
from gateway.options import check_webhook
from protocol import keys

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
            "cancelled")
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 86400  # OpenAI's only window, 24h, is also the longest
INPUT_KEPT_AFTER_S = 86400  # an input file outlives its batch's window by this much at least


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def window_seconds(window: str) -> int:
    """'24h' (OpenAI's), or a shorter window such as '30m' or '90s' (tokenq's extension)."""
    m = _WINDOW.match(window or "")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ApiError(400, f"completion_window: '24h', or a shorter window like '30m' or '90s' "
                            f"(got {window!r})", param="completion_window")
    return seconds


TENANT_WEBHOOK_FIELD = "webhook_url"  # of tokenq:tenant:{name}: where its batches report when they end


async def batch_webhook_url(redis: aioredis.Redis, b: dict[str, str]) -> str | None:
    """`metadata.webhook_url` of the batch, else the tenant's configured one, else None."""
    metadata = json.loads(b.get("metadata") or "{}")
    return metadata.get("webhook_url") or await redis.hget(keys.tenant_key(b["tenant"]), TENANT_WEBHOOK_FIELD)


async def create_batch(redis: aioredis.Redis, tenant: str, input_file_id: str, endpoint: str,
                       completion_window: str, metadata: dict[str, str] | None,
                       retention_s: int) -> dict[str, str]:
    """The new batch's fields. A file whose lines call another endpoint makes a `failed` batch whose
    errors name the line, as OpenAI's validation does; otherwise it is `validating` until a feeder
    takes it. `metadata` is checked already (gateway.schemas.Metadata)."""
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint: one of {', '.join(ENDPOINTS)} (got {endpoint!r})", param="endpoint")
    window_s = window_seconds(completion_window)
    metadata = metadata or {}
    check_webhook(metadata.get("webhook_url"))
    try:
        meta = await read_file(redis, input_file_id, tenant)
    except ApiError as e:
        raise ApiError(e.status, f"input_file_id: {e.message}", param="input_file_id", code=e.code) from None
    if meta.get("purpose") != "batch":
        raise ApiError(400, f"input_file_id: {input_file_id} has purpose {meta.get('purpose')!r}, not 'batch'",
                       param="input_file_id")
    now = time.time()
    batch_id = new_batch_id()
    record = {"id": batch_id, "tenant": tenant, "endpoint": endpoint, "input_file_id": input_file_id,
              "completion_window": completion_window, "status": "validating", "created_at": repr(now),
              "expires_at": repr(now + window_s), "total": meta["lines"], "completed": "0", "failed": "0",
              "cursor": "0", "metadata": json.dumps(metadata)}
    wrong = {url: line for url, line in json.loads(meta.get("urls") or "{}").items() if url != endpoint}
    if wrong:
        url, line = min(wrong.items(), key=lambda item: item[1])
        record.update(status="failed", failed_at=repr(now), total="0", errors=json.dumps([{
            "code": "mismatched_endpoint", "line": line, "param": "url",
            "message": f"line {line}: url {url!r} differs from the batch's endpoint {endpoint!r}"}]))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(K.batch_key(batch_id), mapping=record)
        pipe.zadd(K.tenant_batches_key(tenant), {batch_id: now})
        if record["status"] == "validating":
            pipe.sadd(K.ACTIVE_BATCHES, batch_id)
            pipe.publish(K.NEW_BATCHES, batch_id)
            if await redis.ttl(K.file_key(input_file_id)) < window_s + INPUT_KEPT_AFTER_S:
                # The feeder reads the input until the batch ends: it outlives the window.
                keep = window_s + INPUT_KEPT_AFTER_S
                pipe.expire(K.file_key(input_file_id), keep)
                pipe.expire(K.file_lines_key(input_file_id), keep)
                pipe.hset(K.file_key(input_file_id), "expires_at", repr(now + keep))
        else:
            pipe.expire(K.batch_key(batch_id), retention_s)
            if await batch_webhook_url(redis, record):
                pipe.xadd(keys.WEBHOOK_OUTBOX, {"batch_id": batch_id, "state": "failed"})
        await pipe.execute()
    return record


def batch_errors(b: dict[str, str]) -> dict[str, Any] | None:
    """The Batch object's `errors`: why a batch failed validation (a list object), else None."""
    errors = json.loads(b["errors"]) if b.get("errors") else None
    return {"object": "list", "data": errors} if errors else None


def batch_object(b: dict[str, str]) -> dict[str, Any]:
    """OpenAI's Batch object."""
    obj: dict[str, Any] = {
        "id": b["id"], "object": "batch", "endpoint": b["endpoint"],
        "errors": batch_errors(b),
        "input_file_id": b["input_file_id"], "completion_window": b["completion_window"],
        "status": b["status"], "output_file_id": b.get("output_file_id") or None,
        "error_file_id": b.get("error_file_id") or None,
        "request_counts": {"total": int(b.get("total") or 0), "completed": int(b.get("completed") or 0),
                           "failed": int(b.get("failed") or 0)},
        "metadata": json.loads(b["metadata"]) if b.get("metadata") else None,
        "usage": _usage(b),
    }
    for name in _TIMES:
        obj[name] = int(float(b[name])) if b.get(name) else None
    return obj


def _usage(b: dict[str, str]) -> dict[str, Any]:
    """OpenAI's BatchUsage: the tokens of the lines done so far (output lines only; no reasoning tokens)."""
    prompt, output = int(b.get("input_tokens") or 0), int(b.get("output_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": int(b.get("cached_tokens") or 0)},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


async def read_batch(redis: aioredis.Redis, batch_id: str, tenant: str) -> dict[str, str]:
    b = await redis.hgetall(K.batch_key(batch_id))
    if not b or b.get("tenant") != tenant:
        raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
    return b


# KEYS[1] batch hash. ARGV[1] now. A batch that has not started finishing becomes `cancelling`; the
# feeder stops its lines and ends it `cancelled`. Returns the status after.
CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  return 'cancelling'
end
return status or ''
"""


async def batches_reading(redis: aioredis.Redis, file_id: str) -> list[str]:
    """The batches not yet ended whose input is the file: their feeders read its lines until they end."""
    active = sorted(await redis.smembers(K.ACTIVE_BATCHES))
    if not active:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in active:
            pipe.hget(K.batch_key(batch_id), "input_file_id")
        inputs = await pipe.execute()
    return [b for b, f in zip(active, inputs, strict=True) if f == file_id]


async def cancel_batch(redis: aioredis.Redis, batch_id: str, tenant: str) -> dict[str, str]:
    await read_batch(redis, batch_id, tenant)
    await redis.eval(CANCEL_LUA, 1, K.batch_key(batch_id), repr(time.time()))
    return await read_batch(redis, batch_id, tenant)


async def list_batches(redis: aioredis.Redis, tenant: str, limit: int,
                       after: str | None) -> tuple[list[dict[str, str]], bool]:
    ids = await redis.zrevrange(K.tenant_batches_key(tenant), 0, -1)
    page, more, gone = await read_page(redis, ids, after, K.batch_key, limit)
    if gone:
        await redis.zrem(K.tenant_batches_key(tenant), *gone)
    return page, more
