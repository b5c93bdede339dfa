"""What a webhook is about: a job (`job_…`) or a batch (`batch_…`). Each has its hash (where its delivery
attempts are recorded), its URL and its event body, all read from Redis at delivery time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from batches import keys as batch_keys
from batches.store import batch_errors
from protocol import job_record as F
from protocol import keys
from worker.webhooks.event import _epoch, _iso, event_body

BATCH_PREFIX = "batch_"
TENANT_WEBHOOK_FIELD = "webhook_url"  # of tokenq:tenant:{name}: where the tenant's batches report (as
# batches/store.py's batch_webhook_url reads it; the worker does not import the gateway's packages)


@dataclass(frozen=True)
class Subject:
    record: dict[str, str]
    url: str | None
    tenant: str
    body: str


def is_batch(subject_id: str) -> bool:
    return subject_id.startswith(BATCH_PREFIX)


def subject_key(subject_id: str) -> str:
    if is_batch(subject_id):
        return batch_keys.batch_key(subject_id)
    return keys.job_key(subject_id)


async def load_subject(redis: aioredis.Redis, subject_id: str) -> Subject | None:
    """None when its hash is gone (expired)."""
    record = await redis.hgetall(subject_key(subject_id))
    if not record:
        return None
    tenant = record.get(F.TENANT) or "default"
    if not subject_id.startswith(BATCH_PREFIX):
        return Subject(record, record.get(F.WEBHOOK_URL), tenant, event_body(subject_id, record))
    metadata = json.loads(record.get("metadata") or "{}")
    url = metadata.get("webhook_url") or await redis.hget(keys.tenant_key(tenant), TENANT_WEBHOOK_FIELD)
    return Subject(record, url, tenant, batch_event_body(subject_id, record))


def batch_event_body(batch_id: str, record: dict[str, str]) -> str:
    """`{"type": "batch.<status>", "timestamp", "data": {...}}`, OpenAI's batch event with the counts and
    file ids added."""
    status = record.get("status", "")
    ended = record.get(f"{status}_at")
    data: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "status": status,
        "endpoint": record.get("endpoint"),
        "input_file_id": record.get("input_file_id"),
        "output_file_id": record.get("output_file_id") or None,
        "error_file_id": record.get("error_file_id") or None,
        "request_counts": {name: int(record.get(name) or 0) for name in ("total", "completed", "failed")},
        "errors": batch_errors(record),  # why a batch.failed failed, without a GET
        "metadata": json.loads(record.get("metadata") or "{}"),
        "created_at": _epoch(record.get("created_at")),
        "ended_at": _epoch(ended),
    }
    event = {"type": f"batch.{status}", "timestamp": _iso(ended), "data": data}
    return json.dumps(event, separators=(",", ":"))
