"""What delivery leaves in Redis: each attempt on the job hash, and endpoints disabled by a 410."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from protocol import job_record as F
from protocol import keys

# Append one JSON object to the hash's JSON list, atomically (two deliveries of one job cannot lose an
# entry), and only while the hash exists: an expired job is not recreated without its TTL.
# KEYS[1] job hash; ARGV[1] the attempt's JSON. Returns 1 when appended, 0 when the hash is gone.
_APPEND = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], '{F.WEBHOOK_ATTEMPTS}')
if cur and cur ~= '' and cur ~= '[]' then
  cur = string.sub(cur, 1, -2) .. ',' .. ARGV[1] .. ']'
else
  cur = '[' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], '{F.WEBHOOK_ATTEMPTS}', cur)
return 1
"""


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
    return bool(await redis.eval(_APPEND, 1, keys.job_key(job_id), json.dumps(entry)))


def attempts_of(record: dict[str, str]) -> list[dict]:
    return json.loads(record.get(F.WEBHOOK_ATTEMPTS) or "[]")


def endpoint_key(url: str) -> str:
    return keys.webhook_endpoint_key(hashlib.sha256(url.encode()).hexdigest())


async def disable_endpoint(redis: aioredis.Redis, url: str) -> None:
    """After a 410 Gone no more deliveries go to this URL (DEL the key to enable it again)."""
    await redis.set(endpoint_key(url), repr(time.time()))


async def endpoint_disabled(redis: aioredis.Redis, url: str) -> bool:
    return bool(await redis.exists(endpoint_key(url)))
