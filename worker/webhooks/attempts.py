"""What delivery leaves in Redis: each attempt on the job hash, and endpoints disabled by a 410."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from jobstore import JobStore
from protocol import job_record as F
from protocol import keys


@dataclass(frozen=True)
class Attempt:
    outcome: str  # delivered, retry, failed, disabled, skipped, refused
    status: int | None = None  # the receiver's HTTP status, when it answered
    error: str | None = None  # why there was no 2xx
    next_retry_at: float | None = None  # epoch seconds, when another attempt is scheduled
    at: float = 0.0


async def record_attempt(redis: aioredis.Redis, job_id: str, attempt: Attempt) -> bool:
    entry = asdict(attempt)
    entry["at"] = attempt.at or time.time()
    # Appended atomically, and only while the job exists (an expired job is not recreated without its TTL).
    return await JobStore(redis).record_webhook_attempt(job_id, json.dumps(entry))


def attempts_of(record: dict[str, str]) -> list[dict]:
    return json.loads(record.get(F.WEBHOOK_ATTEMPTS) or "[]")


def endpoint_key(url: str) -> str:
    return keys.webhook_endpoint_key(hashlib.sha256(url.encode()).hexdigest())


async def disable_endpoint(redis: aioredis.Redis, url: str) -> None:
    """After a 410 Gone no more deliveries go to this URL (DEL the key to enable it again)."""
    await redis.set(endpoint_key(url), repr(time.time()))


async def endpoint_disabled(redis: aioredis.Redis, url: str) -> bool:
    return bool(await redis.exists(endpoint_key(url)))
