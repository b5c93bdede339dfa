"""Admission of one job for a tenant: its rate limits, its queued-jobs limit and its Idempotency-Key,
decided in one Lua script so that several gateway processes share the same counters and two copies of
one request cannot both be admitted.

Requests and tokens per minute use a sliding window approximated from two fixed one-minute counters
(the previous minute's count weighted by how much of it is still inside the window): two small keys per
limit, however many requests. A request charges the counters only when it is admitted."""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from gateway.auth import Tenant
from gateway.errors import ApiError
from gateway.redis_pipe import RedisPipe, Script, eval_script
from protocol import keys

WINDOW_S = 60
IDEMPOTENCY_TTL_S = 86400
MAX_IDEMPOTENCY_KEY_CHARS = 255

# KEYS: 1 idempotency key, 2/3 rpm counters (this minute, last minute), 4/5 tpm counters, 6 queued counter.
# ARGV: 1 job id, 2 '1' when an idempotency key was given, 3 its TTL, 4 rpm, 5 tpm, 6 tokens of this
# job, 7 max_queued (0: no limit), 8 fraction of this minute gone, 9 window seconds.
# Returns {0, first job id} for a repeat, {1} when admitted, {2, limit, wait ms, used} when refused.
ADMIT_LUA = """
if ARGV[2] == '1' then
  local first = redis.call('GET', KEYS[1])
  if first then return {0, first} end
end
local frac = tonumber(ARGV[8])
local window = tonumber(ARGV[9])
local function refuse(cur_key, prev_key, limit, cost)
  if limit <= 0 then return nil end
  local cur = tonumber(redis.call('GET', cur_key) or '0')
  local prev = tonumber(redis.call('GET', prev_key) or '0')
  local used = prev * (1 - frac) + cur
  if used + cost <= limit then return nil end
  local wait
  if cost > limit then
    wait = window
  elseif cur + cost <= limit then
    -- fits later in this minute, once enough of the last minute has slid out (prev > 0 here)
    wait = (1 - (limit - cur - cost) / prev - frac) * window
  else
    -- fits next minute, once enough of this minute's count has slid out
    wait = (1 - frac + math.max(0, 1 - (limit - cost) / cur)) * window
  end
  return {math.max(1, math.ceil(wait * 1000)), math.floor(used)}
end
local r = refuse(KEYS[2], KEYS[3], tonumber(ARGV[4]), 1)
if r then return {2, 'rpm', r[1], r[2]} end
r = refuse(KEYS[4], KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]))
if r then return {2, 'tpm', r[1], r[2]} end
local max_queued = tonumber(ARGV[7])
if max_queued > 0 then
  local queued = tonumber(redis.call('GET', KEYS[6]) or '0')
  if queued >= max_queued then return {2, 'max_queued', 1000, queued} end
end
if tonumber(ARGV[4]) > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], window * 2)
end
if tonumber(ARGV[5]) > 0 then
  redis.call('INCRBY', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], window * 2)
end
if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3]) end
return {1}
"""


def counter_key(tenant: str, limit: str, minute: int) -> str:
    return f"{keys.tenant_key(tenant)}:{limit}:{minute}"


def check_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value) > MAX_IDEMPOTENCY_KEY_CHARS or not value.isprintable():
        raise ApiError(400, f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
                       param="Idempotency-Key")
    return value


ADMIT = Script(ADMIT_LUA)


class Admission:
    def __init__(self, redis: aioredis.Redis | RedisPipe) -> None:
        self.redis = redis

    async def admit(self, tenant: Tenant, job_id: str, tokens: int, idempotency_key: str | None,
                    now: float | None = None) -> str | None:
        """None when the job is admitted (counters charged, the key bound to `job_id`); the first job's
        id when the key was seen before; 429 when a limit is reached."""
        if not tenant.limited and idempotency_key is None:
            return None
        now = time.time() if now is None else now
        minute, into = divmod(now, WINDOW_S)
        name = tenant.name
        result = await eval_script(
            self.redis, ADMIT,
            [keys.idem_key(name, idempotency_key or ""),
             counter_key(name, "rpm", int(minute)), counter_key(name, "rpm", int(minute) - 1),
             counter_key(name, "tpm", int(minute)), counter_key(name, "tpm", int(minute) - 1),
             keys.tenant_queued_key(name)],
            [job_id, "1" if idempotency_key is not None else "0", IDEMPOTENCY_TTL_S,
             tenant.rpm, tenant.tpm, tokens, tenant.max_queued, repr(into / WINDOW_S), WINDOW_S])
        if result[0] == 0:
            # The key bound to this very job: a retry of this call after its reply was lost.
            return None if result[1] == job_id else result[1]
        if result[0] == 2:
            raise limit_error(tenant, result[1], int(result[2]), int(result[3]), tokens)
        return None


def limit_error(tenant: Tenant, limit: str, wait_ms: int, used: int, tokens: int) -> ApiError:
    retry_after = max(1, math.ceil(wait_ms / 1000))
    if limit == "rpm":
        message = (f"rate limit reached for requests per minute (rpm) of tenant {tenant.name!r}: "
                   f"limit {tenant.rpm}, used {used}; try again in {retry_after}s")
        type_, code = "requests", "rate_limit_exceeded"
    elif limit == "tpm":
        if tokens > tenant.tpm:
            message = (f"request too large for tokens per minute (tpm) of tenant {tenant.name!r}: "
                       f"limit {tenant.tpm}, requested {tokens} (prompt + max_tokens)")
        else:
            message = (f"rate limit reached for tokens per minute (tpm) of tenant {tenant.name!r}: "
                       f"limit {tenant.tpm}, used {used}, requested {tokens} (prompt + max_tokens); "
                       f"try again in {retry_after}s")
        type_, code = "tokens", "rate_limit_exceeded"
    else:
        message = (f"too many queued jobs (max_queued) for tenant {tenant.name!r}: limit "
                   f"{tenant.max_queued}, queued {used}; try again when some have finished")
        type_, code = "queued_jobs", "max_queued_exceeded"
    return ApiError(429, message, code=code, type_=type_, headers={"Retry-After": str(retry_after)})
