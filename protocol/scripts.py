"""The atomic writes to a job hash, as Lua scripts shared by worker and gateway (text only, no I/O).

A job reclaimed by a second worker, or cancelled by the gateway while it runs, is never finished twice:
the first final write wins and later ones are dropped. Everything that must happen exactly once at the
end of a job happens inside that first write: the tenant's queued counter goes down and, for a job with
a webhook, an entry goes on the webhook outbox stream, so no crash between two writes can lose either.
"""

from __future__ import annotations

import hashlib

from protocol import job_record as f
from protocol import keys
from protocol.jobs import FINAL_STATES


class Script:
    """A Lua script as clients send it: by its SHA1 (EVALSHA), with the source for when Redis lacks it."""

    def __init__(self, lua: str) -> None:
        self.lua = lua
        self.sha = hashlib.sha1(lua.encode()).hexdigest()


_FINAL = "{" + ", ".join(f"['{s.value}'] = true" for s in sorted(FINAL_STATES, key=lambda s: s.value)) + "}"

# KEYS[1] job hash. ARGV: started_at, worker id.
# Returns {1, streamed, seq} when started, {0} when the job is already final, {-1} when the hash is gone
# (the job expired or never existed): in both latter cases the caller acknowledges and drops the entry.
# A rerun (the job was reclaimed from a dead worker) keeps `seq` so event numbers only ever increase, and
# clears the old attempt's text: offsets restart at 0 with the new text.
START_JOB = f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], '{f.STATE}')
if not state then return {{-1}} end
if final[state] then return {{0}} end
redis.call('HSET', KEYS[1], '{f.STATE}', 'running', '{f.STARTED_AT}', ARGV[1], '{f.WORKER}', ARGV[2])
redis.call('HINCRBY', KEYS[1], '{f.ATTEMPTS}', 1)
if redis.call('HEXISTS', KEYS[1], '{f.TEXT}') == 1 then
  redis.call('HSET', KEYS[1], '{f.TEXT}', '')
end
local streamed = redis.call('HGET', KEYS[1], '{f.STREAMED}') or '0'
local seq = redis.call('HGET', KEYS[1], '{f.SEQ}') or '0'
return {{1, streamed, seq}}
"""

# KEYS: the job hashes of one publish batch. ARGV[1]: a JSON list with one row per key: [text so far, seq,
# events channel, the delta event's JSON, first_token_at or ""]. One command, and one JSON argument
# encoded in C, for a whole engine step: packing an HSET and a PUBLISH per running job per step in Python
# cost the worker more CPU than the engine's own host work, and took the GIL from the engine thread.
PUBLISH_DELTAS = f"""
local rows = cjson.decode(ARGV[1])
for i = 1, #KEYS do
  local r = rows[i]
  redis.call('HSET', KEYS[i], '{f.TEXT}', r[1], '{f.SEQ}', r[2])
  if r[5] ~= '' then
    redis.call('HSET', KEYS[i], '{f.FIRST_TOKEN_AT}', r[5])
  end
  redis.call('PUBLISH', r[3], r[4])
end
return #KEYS
"""

# KEYS[1] job hash, KEYS[2] the tenant's queued counter, KEYS[3] the webhook outbox stream.
# ARGV: channel, state, field ('result' or 'error'), its JSON, finished_at, text, retention seconds,
# first_token_at ('' when none), job id.
# Returns 1 when this write was the first final one, 0 when the job was already final (dropped).
# The final StateEvent takes the next sequence number, so the hash's `seq` stays "last published event".
FINISH_JOB = f"""
local final = {_FINAL}
local state = redis.call('HGET', KEYS[1], '{f.STATE}')
if state and final[state] then return 0 end
local seq = tonumber(redis.call('HGET', KEYS[1], '{f.SEQ}') or '0') + 1
redis.call('HSET', KEYS[1], '{f.STATE}', ARGV[2], ARGV[3], ARGV[4], '{f.FINISHED_AT}', ARGV[5],
           '{f.TEXT}', ARGV[6], '{f.SEQ}', seq)
if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[1], '{f.FIRST_TOKEN_AT}') == 0 then
  redis.call('HSET', KEYS[1], '{f.FIRST_TOKEN_AT}', ARGV[8])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
if state then
  if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
  local hook = redis.call('HGET', KEYS[1], '{f.WEBHOOK_URL}')
  if hook and hook ~= '' then
    redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[9], 'state', ARGV[2])
  end
end
redis.call('PUBLISH', ARGV[1],
  '{{"type":"state","seq":' .. seq .. ',"state":"' .. ARGV[2] .. '","' .. ARGV[3] .. '":' .. ARGV[4] .. '}}')
return 1
"""


def finish_keys(job_id: str, tenant: str) -> list[str]:
    """KEYS of FINISH_JOB for one job."""
    return [keys.job_key(job_id), keys.tenant_queued_key(tenant), keys.WEBHOOK_OUTBOX]
