"""Cached answers in Redis: read by the gateway, written when a job succeeds.

An entry is a string key with the tenant's TTL; the tenant's sorted set of entry ids by expiry time
bounds how many it keeps (past the bound the soonest to expire go first). Semantic entries are also
announced on LOG_STREAM (added, removed) so that every gateway's vector index follows them. The script
reaches entry keys it derives from the tenant's set, as a single Redis (not a cluster) allows."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from jobstore.runner import run
from jobstore.scripts import Script
from protocol.jobs import JobResult
from respcache import keys

PENDING_TTL_S = 7 * 24 * 3600  # as long as a job may wait in a lane and still be filled in

# Every removal of a semantic entry is announced on the log, so that every gateway's index drops it.
_ANNOUNCE_REMOVAL = """
local function announce_removal(log, maxlen, tenant, id)
  if string.sub(id, 1, 2) == 's:' then
    redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', 'op', 'del', 'tenant', tenant, 'id', id)
  end
end
local function removed(id) announce_removal(KEYS[%d], ARGV[%d], ARGV[%d], id) end
"""  # formatted with each script's positions of the log key, its maxlen and the tenant

# KEYS: 1 entry, 2 the tenant's entry set, 3 the log stream, 4 the pending record (deleted).
# ARGV: 1 entry id, 2 entry JSON, 3 ttl s, 4 expires at, 5 now, 6 max entries, 7 tenant, 8 entry key
# prefix, 9 log maxlen, 10 scope ('' for exact), 11 vector (base64, '' for exact), 12 question text.
STORE = Script(_ANNOUNCE_REMOVAL % (3, 9, 7) + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])) do removed(id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if ARGV[10] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', 'op', 'add', 'tenant', ARGV[7], 'id', ARGV[1],
             'scope', ARGV[10], 'vec', ARGV[11], 'exp', ARGV[4], 'text', ARGV[12])
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do
    redis.call('DEL', ARGV[8] .. popped[i])
    removed(popped[i])
  end
end
redis.call('DEL', KEYS[4])
return 1
""")


# KEYS: 1 the tenant's entry set, 2 the log stream. ARGV: 1 tenant, 2 entry key prefix, 3 log maxlen, 4... ids.
# Returns the ids the tenant held.
REMOVE = Script(_ANNOUNCE_REMOVAL % (2, 3, 1) + """
local held = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    held[#held + 1] = id
    redis.call('DEL', ARGV[2] .. id)
    removed(id)
  end
end
return held
""")
PURGE_BATCH = 1000  # ids a purge removes per script call, so that Redis is never held for long


@dataclass(frozen=True)
class Entry:
    """A cached answer as a hit reads it."""

    result: JobResult
    kind: str
    model: str
    text: str = ""  # the semantic entry's question
    scope: str = ""
    sibling: str = ""  # the same answer's other entry (its exact one for a semantic entry, and back)


def entry_json(result_json: str, kind: str, model: str, text: str = "", scope: str = "", vector: str = "",
               sibling: str = "") -> str:
    return json.dumps({"result": json.loads(result_json), "kind": kind, "model": model, "text": text,
                       "scope": scope, "vec": vector, "sibling": sibling}, ensure_ascii=False,
                      separators=(",", ":"))


def parse_entry(raw: str | None) -> Entry | None:
    if not raw:
        return None
    data = json.loads(raw)
    return Entry(JobResult.model_validate(data["result"]), data["kind"], data["model"], data.get("text", ""),
                 data.get("scope", ""), data.get("sibling", ""))


async def read_entry(redis: aioredis.Redis, tenant: str, entry_id: str) -> Entry | None:
    return parse_entry(await redis.get(keys.entry_key(tenant, entry_id)))


async def write_pending(redis: aioredis.Redis, job_id: str, pending: dict[str, Any]) -> None:
    await redis.set(keys.pending_key(job_id), json.dumps(pending, separators=(",", ":")), ex=PENDING_TTL_S)


async def store(redis: aioredis.Redis, tenant: str, entry_id: str, entry: str, ttl_s: int, max_entries: int,
                pending_key: str = "", scope: str = "", vector_b64: str = "", text: str = "",
                now: float | None = None) -> None:
    now = time.time() if now is None else now
    await run(redis, STORE, [keys.entry_key(tenant, entry_id), keys.index_key(tenant), keys.LOG_STREAM,
                        pending_key or keys.pending_key("-")],
                [entry_id, entry, ttl_s, repr(now + ttl_s), repr(now), max_entries, tenant,
                 keys.entry_key(tenant, ""), keys.LOG_MAXLEN, scope, vector_b64, text])


async def fill(redis: aioredis.Redis, job_id: str, result_json: str) -> int:
    """Writes the entries a succeeded job was expected to fill (its pending record, if any); returns how
    many. Called by the worker after the job's first final write. The answer's two entries expire together,
    so that the bound, which drops the soonest to expire first, drops its semantic entry ("s:" sorts first
    among equal times) before its exact one: a repeat of the very question, which the semantic lookup
    leaves to the exact cache, is never the one that misses."""
    raw = await redis.get(keys.pending_key(job_id))
    if raw is None:
        return 0
    p = json.loads(raw)
    written = 0
    now = time.time()
    sem = p.get("semantic")
    exact = p.get("exact")
    if exact:
        await store(redis, p["tenant"], exact,
                    entry_json(result_json, p["kind"], p["model"], sibling=sem["id"] if sem else ""),
                    p["ttl"], p["max"], keys.pending_key(job_id), now=now)
        written += 1
    if sem:
        await store(redis, p["tenant"], sem["id"],
                    entry_json(result_json, p["kind"], p["model"], sem["text"], sem["scope"], sem["vec"],
                               sibling=exact or ""),
                    p["ttl"], p["max"], keys.pending_key(job_id), sem["scope"], sem["vec"], sem["text"], now=now)
        written += 1
    return written


async def remove_answer(redis: aioredis.Redis, tenant: str, entry_id: str) -> list[str]:
    """Removes the entry and its sibling (the same answer's other entry), so that a wrong answer taken out
    by the id its hit named does not go on answering through the other; returns the ids the tenant held."""
    entry = await read_entry(redis, tenant, entry_id)
    return await _remove(redis, tenant, [entry_id, *([entry.sibling] if entry is not None and entry.sibling else [])])


async def remove(redis: aioredis.Redis, tenant: str, entry_ids: list[str]) -> int:
    """Removes these entries of the tenant (every gateway's index drops the semantic ones); returns how many
    it held."""
    return len(await _remove(redis, tenant, entry_ids))


async def _remove(redis: aioredis.Redis, tenant: str, entry_ids: list[str]) -> list[str]:
    """The ids of these entries the tenant held, removed."""
    if not entry_ids:
        return []
    held = await run(redis, REMOVE, [keys.index_key(tenant), keys.LOG_STREAM],
                     [tenant, keys.entry_key(tenant, ""), keys.LOG_MAXLEN, *entry_ids])
    return [i.decode() if isinstance(i, bytes) else i for i in held]


async def purge(redis: aioredis.Redis, tenant: str) -> int:
    """Removes every entry of the tenant, PURGE_BATCH at a time; returns how many."""
    total = 0
    while ids := await redis.zrange(keys.index_key(tenant), 0, PURGE_BATCH - 1):
        total += await remove(redis, tenant, ids)
    return total
