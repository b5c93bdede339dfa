"""What delivery leaves in Redis: each attempt on the job's (or batch's) hash, and endpoints disabled by a 410."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from jobstore import JobStore, runner
from jobstore.scripts import APPEND_WEBHOOK_ATTEMPT
from protocol import keys
from worker.webhooks.subjects import is_batch, subject_key


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
    # Appended atomically, and only while the job (or batch) exists (an expired one is not recreated
    # without its TTL). A batch's hash takes the same script.
    if is_batch(job_id):
        return bool(await runner.run(redis, APPEND_WEBHOOK_ATTEMPT, [subject_key(job_id)], [json.dumps(entry)]))
    return await JobStore(redis).record_webhook_attempt(job_id, json.dumps(entry))


def endpoint_key(tenant: str, url: str) -> str:
    return keys.webhook_endpoint_key(tenant, hashlib.sha256(url.encode()).hexdigest())


async def disable_endpoint(redis: aioredis.Redis, tenant: str, url: str, for_s: float) -> None:
    """After a 410 Gone this tenant's deliveries skip the URL for `for_s` seconds (DEL the key to enable it
    sooner). Per tenant: one tenant's receiver saying Gone says nothing of another's use of the URL; with
    an expiry: a URL that is gone today may be served again later."""
    await redis.set(endpoint_key(tenant, url), repr(time.time()), ex=max(1, round(for_s)))


async def endpoint_disabled(redis: aioredis.Redis, tenant: str, url: str) -> bool:
    return bool(await redis.exists(endpoint_key(tenant, url)))
