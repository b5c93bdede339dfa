"""Every Lua script of the job's state machine, in one place (text only; jobstore/store.py runs them).

Rules that hold in every script:
- a write to a job whose hash is gone (expired, evicted, never there) does nothing: no script recreates
  a job without its tenant;
- the first final write wins; everything that must happen once at the end of a job (the tenant's and the
  lane's counters go down, the deadline leaves the sweep's set, a webhook goes on the outbox, the final
  StateEvent is published) happens inside that write, through the one `finish` function below;
- admission (limits, the lane's fair share, Idempotency-Key) and the writes of a new job are one script,
  so concurrent requests cannot pass a limit between a check and its increment;
- a script touches only the keys it is given in KEYS, and the keys of one call all carry one model's hash
  tag (protocol/keys.py), so on a Redis Cluster every call runs on one node, in one slot. Channels a
  script publishes on carry the same tag (SPUBLISH on a cluster: `Script.sharded`).
"""

from __future__ import annotations

import hashlib

from protocol import job_record as f
from protocol import keys
from protocol.jobs import FINAL_STATES


class Script:
    """A Lua script as clients send it: by its SHA1 (EVALSHA), with the source for when Redis lacks it.
    `sharded` is the same script for a Redis Cluster: it publishes with SPUBLISH, whose channel (the job's,
    tagged as its keys are) stays on the node of the script's slot."""

    def __init__(self, lua: str) -> None:
        self.lua = lua
        self.sha = hashlib.sha1(lua.encode()).hexdigest()
        ALL.append(self)
        sharded = lua.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        self.sharded = Script(sharded) if sharded != lua else self


ALL: list[Script] = []  # every script: loaded together after a NOSCRIPT, so none is present alone

# The events channel of the job whose hash key a Lua variable holds (protocol/keys.events_channel).
def _lua_channel(job_hash: str) -> str:
    return f"{job_hash} .. '{keys.EVENTS_SUFFIX}'"


_FINAL = "{" + ", ".join(f"['{s.value}'] = true" for s in sorted(FINAL_STATES, key=lambda s: s.value)) + "}"

# The keys of one job that a final write touches, in this order (jobstore.store.JobRef.finish_keys):
# 1 job hash, 2 its text, 3 the tenant's queued counter, 4 the lane's depth hash, 5 the webhook outbox,
# 6 the deadlines set.
FINISH_KEYS = 6

# finish(k, job id, state, result JSON or '', error JSON or '', finished_at, first_token_at or '', retention)
# -> 1 when this was the first final write, 0 when the job was already final, -1 when its hash is gone.
# The final StateEvent takes the next sequence number, so the hash's `seq` stays "last published event".
_FINISH_FN = f"""
local FINAL = {_FINAL}
local function finish(k, job_id, state, result, err, finished_at, first_token_at, retention)
  local cur = redis.call('HGET', k[1], '{f.STATE}')
  if not cur then return -1 end
  if FINAL[cur] then return 0 end
  local seq = tonumber(redis.call('HGET', k[1], '{f.SEQ}') or '0') + 1
  redis.call('HSET', k[1], '{f.STATE}', state, '{f.FINISHED_AT}', finished_at, '{f.SEQ}', seq)
  local event = '{{"type":"state","seq":' .. seq .. ',"state":"' .. state .. '"'
  if result ~= '' then
    redis.call('HSET', k[1], '{f.RESULT}', result)
    event = event .. ',"result":' .. result
  end
  if err ~= '' then
    redis.call('HSET', k[1], '{f.ERROR}', err)
    event = event .. ',"error":' .. err
  end
  if first_token_at ~= '' and redis.call('HEXISTS', k[1], '{f.FIRST_TOKEN_AT}') == 0 then
    redis.call('HSET', k[1], '{f.FIRST_TOKEN_AT}', first_token_at)
  end
  redis.call('EXPIRE', k[1], retention)
  redis.call('EXPIRE', k[2], retention)
  if tonumber(redis.call('DECR', k[3])) < 0 then redis.call('SET', k[3], 0) end
  local tenant = redis.call('HGET', k[1], '{f.TENANT}') or ''
  if tonumber(redis.call('HINCRBY', k[4], tenant, -1)) <= 0 then redis.call('HDEL', k[4], tenant) end
  redis.call('ZREM', k[6], job_id)
  local hook = redis.call('HGET', k[1], '{f.WEBHOOK_URL}')
  if hook and hook ~= '' then
    redis.call('XADD', k[5], '*', 'job_id', job_id, 'state', state)
  end
  redis.call('PUBLISH', {_lua_channel('k[1]')}, event .. '}}')
  return 1
end
local function job_keys(first)
  return {{KEYS[first], KEYS[first + 1], KEYS[first + 2], KEYS[first + 3], KEYS[first + 4], KEYS[first + 5]}}
end
"""

# Drops a job's stream entry (acknowledged and deleted); KEYS of the stream, the entry id.
_DROP_ENTRY_FN = f"""
local function drop_entry(stream, entry)
  if entry then
    redis.call('XACK', stream, '{keys.GROUP}', entry)
    redis.call('XDEL', stream, entry)
  end
end
"""

# refuse(this minute's counter, last minute's, limit, cost, fraction of this minute gone, window seconds):
# nil when `cost` more fits the limit over the sliding window (the last minute's count fading out linearly),
# else {wait ms until it fits, used}. A limit of 0 or less is no limit.
_RATE_FN = """
local function refuse(cur_key, prev_key, limit, cost, frac, window)
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
  return {math.max(1, math.ceil(wait * 1000)), math.ceil(used)}
end
"""

# KEYS: 1 job hash, 2 idempotency key, 3/4 rpm counters (this minute, last minute), 5/6 tpm counters,
# 7 the tenant's queued counter, 8 the job's stream, 9 the lane's tenant set, 10 the lane's depth hash,
# 11 the deadlines set.
# ARGV: 1 job id, 2 '1' when an idempotency key was given, 3 its TTL, 4 rpm, 5 tpm, 6 tokens of this job,
# 7 max_queued, 8 fraction of this minute gone, 9 window seconds, 10 the lane's max depth (0: none for
# all of these limits), 11 tenant, 12 payload JSON, 13 deadline or '', then the hash's other fields and values.
# Returns {1, entry id, 1 when the tenant is new to the lane else 0} when admitted and written; {0, first job id} for a repeated key; {2, limit, wait ms,
# used, limit value} when refused; {3, entry id} when this very job exists already (a retry after a lost
# reply, which must not queue it twice).
# Fair share: when the lane holds max depth jobs or more, a tenant is still admitted while it holds fewer
# than ceil(max depth / tenants with jobs in the lane, itself included).
SUBMIT = Script(f"""{_RATE_FN}
if redis.call('EXISTS', KEYS[1]) == 1 then return {{3, redis.call('HGET', KEYS[1], '{f.ENTRY_ID}')}} end
if ARGV[2] == '1' then
  local first = redis.call('GET', KEYS[2])
  if first then return {{0, first}} end
end
local frac = tonumber(ARGV[8])
local window = tonumber(ARGV[9])
local rpm, tpm, tokens = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local r = refuse(KEYS[3], KEYS[4], rpm, 1, frac, window)
if r then return {{2, 'rpm', r[1], r[2], rpm}} end
r = refuse(KEYS[5], KEYS[6], tpm, tokens, frac, window)
if r then return {{2, 'tpm', r[1], r[2], tpm}} end
local max_queued = tonumber(ARGV[7])
if max_queued > 0 then
  local queued = tonumber(redis.call('GET', KEYS[7]) or '0')
  if queued >= max_queued then return {{2, 'max_queued', 1000, queued, max_queued}} end
end
local tenant = ARGV[11]
local max_depth = tonumber(ARGV[10])
if max_depth > 0 then
  local counts = redis.call('HGETALL', KEYS[10])
  local total, tenants, mine = 0, 0, 0
  for i = 1, #counts, 2 do
    local n = tonumber(counts[i + 1])
    total = total + n
    if n > 0 then tenants = tenants + 1 end
    if counts[i] == tenant then mine = n end
  end
  if mine <= 0 then tenants = tenants + 1 end
  local share = math.ceil(max_depth / tenants)
  if total >= max_depth and mine >= share then return {{2, 'queue_full', 1000, total, share}} end
end
if rpm > 0 then
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], window * 2)
end
if tpm > 0 then
  redis.call('INCRBY', KEYS[5], tokens)
  redis.call('EXPIRE', KEYS[5], window * 2)
end
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3]) end
local id = redis.call('XADD', KEYS[8], '*', 'job_id', ARGV[1], 'payload', ARGV[12])
local added = redis.call('SADD', KEYS[9], tenant)
redis.call('HSET', KEYS[1], '{f.ENTRY_ID}', id, '{f.PAYLOAD}', ARGV[12], unpack(ARGV, 14))
redis.call('INCR', KEYS[7])
redis.call('HINCRBY', KEYS[10], tenant, 1)
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], '{f.DEADLINE}', ARGV[13])
  redis.call('ZADD', KEYS[11], ARGV[13], ARGV[1])
end
return {{1, id, added}}
""")

# KEYS: 1 the rpm counter, 2 the tpm counter of the minute a job was admitted in. ARGV: 1 requests, 2 tokens
# to give back. A counter gone (its minute past) is left alone.
REFUND = Script("""
for i = 1, 2 do
  local n = tonumber(ARGV[i])
  if n > 0 and redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], n) end
end
return 1
""")

# KEYS: 1 job hash, 2 its text. Returns {the hash as HGETALL gives it, the text or false}: read at one
# instant where no MULTI can be had (a cluster).
READ = Script("return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or false}")

# KEYS: 1 job hash, 2 its text; ARGV: the fields. Returns {their values, the text or false}.
SNAPSHOT = Script("return {redis.call('HMGET', KEYS[1], unpack(ARGV)), redis.call('GET', KEYS[2]) or false}")

# KEYS: 1 job hash, 2 the Idempotency-Key's binding, 3 the webhook outbox, 4/5 rpm counters (this minute, last
# minute). ARGV: 1 job id, 2 '1' when the job has a key, 3 the key's TTL, 4 retention, 5 '1' when the job has a
# webhook, 6 rpm (0: none), 7 fraction of this minute gone, 8 window seconds, then the hash's field/value pairs.
# A job final from its start (a response-cache hit): it counts against rpm as every request does, and is bound
# to its key in the step that writes it, as SUBMIT binds a queued job's. Returns {1, job id} when written,
# {0, first job id} when the key was bound before (nothing written or counted), {2, 'rpm', wait ms, used,
# rpm} when refused.
WRITE_FINISHED = Script(f"""{_RATE_FN}
if ARGV[2] == '1' then
  local first = redis.call('GET', KEYS[2])
  if first then return {{0, first}} end
end
local rpm, window = tonumber(ARGV[6]), tonumber(ARGV[8])
local r = refuse(KEYS[4], KEYS[5], rpm, 1, tonumber(ARGV[7]), window)
if r then return {{2, 'rpm', r[1], r[2], rpm}} end
if rpm > 0 then
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], window * 2)
end
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1], 'state', redis.call('HGET', KEYS[1], '{f.STATE}'))
end
return {{1, ARGV[1]}}
""")

# KEYS[1] idempotency key. ARGV[1] the job id it must still map to.
RELEASE_IDEMPOTENCY_KEY = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")

# A completion's clients waiting on one job: its first request, and the repeats of its Idempotency-Key that
# came while it ran (`waiters` counts those). A client that leaves cancels the job only when no other one
# waits, and then releases the key in the same step, so that a retry racing the cancel either waits with
# the others (it came first) or runs anew (it came after): never does it take up the cancelled job.
# KEYS: 1 job hash, 2 idempotency key. ARGV: 1 job id.
# ATTACH returns 1 (one more waits), 0 (the job is final or gone: its answer stands), -1 (its key was released:
# the job is being cancelled, submit again).
ATTACH = Script(f"""
local final = {_FINAL}
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local state = redis.call('HGET', KEYS[1], '{f.STATE}')
if not state or final[state] then return 0 end
redis.call('HINCRBY', KEYS[1], '{f.WAITERS}', 1)
return 1
""")
# ARGV: 1 job id, 2 '1' when the client sent a key. Returns 1 when the leaving client was the last one of a job
# still running (the caller cancels it; its key is released here), else 0.
LEAVE = Script(f"""
local final = {_FINAL}
local h = redis.call('HMGET', KEYS[1], '{f.STATE}', '{f.WAITERS}')
if not h[1] or final[h[1]] then return 0 end
if tonumber(h[2] or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], '{f.WAITERS}', -1)
  return 0
end
if ARGV[2] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
""")

# KEYS[1] job hash. Only an existing job gets the flag.
MARK_STREAMED = Script(f"""
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], '{f.STREAMED}', '1') end
return 0
""")

# KEYS: pairs (job hash, its text) per job. ARGV: started_at, worker id.
# Returns per job {1, streamed, seq} when started, {0} when already final, {-1} when the hash is gone (in
# both cases the caller acknowledges and drops the entry), {2} when its cancel was asked while it ran on a
# worker that died (it is not run again: the caller ends it with END_CANCELLED). A rerun (the job was reclaimed from a
# dead worker) keeps `seq`, so event numbers only ever increase, and drops the old attempt's text: offsets
# restart at 0 with the new text.
START = Script(f"""
local final = {_FINAL}
local out = {{}}
for i = 1, #KEYS, 2 do
  local job, text = KEYS[i], KEYS[i + 1]
  local h = redis.call('HMGET', job, '{f.STATE}', '{f.CANCEL_REQUESTED}', '{f.STREAMED}', '{f.SEQ}')
  local state = h[1]
  if not state then
    out[#out + 1] = {{-1}}
  elseif final[state] then
    out[#out + 1] = {{0}}
  elseif h[2] == '1' then
    out[#out + 1] = {{2}}
  else
    redis.call('HSET', job, '{f.STATE}', 'running', '{f.STARTED_AT}', ARGV[1], '{f.WORKER}', ARGV[2])
    redis.call('HINCRBY', job, '{f.ATTEMPTS}', 1)
    redis.call('DEL', text)
    out[#out + 1] = {{1, h[3] or '0', h[4] or '0'}}
  end
end
return out
""")

# KEYS: pairs (job hash, its text) per job of one publish batch. ARGV[1]: a JSON list with one row per job:
# [job id, the new text, its seq, the DeltaEvent JSON, first_token_at or "", output tokens so far]. Each delta APPENDs, so a long stream
# costs Redis its length once, not once per flush. A row whose seq the hash has already (a retried flush),
# or whose job is final or gone, is skipped. One command and one JSON argument for a whole engine step.
APPEND_DELTAS = Script(f"""
local final = {_FINAL}
local rows = cjson.decode(ARGV[1])
local n = 0
for i, r in ipairs(rows) do
  local job, text = KEYS[2 * i - 1], KEYS[2 * i]
  local state = redis.call('HGET', job, '{f.STATE}')
  if state and not final[state] and tonumber(redis.call('HGET', job, '{f.SEQ}') or '0') < r[3] then
    redis.call('APPEND', text, r[2])
    redis.call('HSET', job, '{f.SEQ}', r[3], '{f.OUTPUT_TOKENS}', r[6] or 0)
    if r[5] ~= '' then redis.call('HSET', job, '{f.FIRST_TOKEN_AT}', r[5]) end
    redis.call('PUBLISH', {_lua_channel('job')}, r[4])
    n = n + 1
  end
end
return n
""")

# KEYS: the job's FINISH_KEYS. ARGV: job id, state, result JSON or '', error JSON or '', finished_at,
# first_token_at or '', retention seconds. Returns finish's answer.
FINISH = Script(_FINISH_FN + """
return finish(job_keys(1), ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
""")

# KEYS: FINISH_KEYS, 7 the entry's stream. ARGV: as FINISH, 8 the entry id.
# Ends a job that never reached the engine and drops its entry, at once.
FINISH_ENTRY = Script(_FINISH_FN + _DROP_ENTRY_FN + """
local written = finish(job_keys(1), ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
drop_entry(KEYS[7], ARGV[8])
return written
""")

# partial_result(job hash, its text key): the result JSON of a job stopped mid-run (`abort`), with the text
# published so far and its usage; a job of several choices rebuilds each from the text's log of lines.
_PARTIAL_RESULT_FN = f"""
local function partial_result(job, text_key)
  local payload = cjson.decode(redis.call('HGET', job, '{f.PAYLOAD}') or '{{}}')
  local prompt = 0
  if type(payload['prompt_token_ids']) == 'table' then prompt = #payload['prompt_token_ids'] end
  local made = tonumber(redis.call('HGET', job, '{f.OUTPUT_TOKENS}') or '0')  -- of the text published
  local result = {{text = redis.call('GET', text_key) or '', finish_reason = 'abort',
    usage = {{prompt_tokens = prompt, completion_tokens = made, total_tokens = prompt + made, cached_tokens = 0}}}}
  local n = tonumber(redis.call('HGET', job, '{f.CHOICES}') or '1')
  if n > 1 then  -- the text is a log of [index, text] lines (protocol/choice_text.py)
    local parts = {{}}
    for i = 1, n do parts[i] = {{}} end
    for line in string.gmatch(result.text, '[^\\n]+') do
      local rec = cjson.decode(line)
      table.insert(parts[rec[1] + 1], rec[2])
    end
    result.choices = {{}}
    for i = 1, n do
      result.choices[i] = {{index = i - 1, text = table.concat(parts[i]), finish_reason = 'abort'}}
    end
    result.text = result.choices[1].text
  end
  return cjson.encode(result)
end
"""

# KEYS: FINISH_KEYS, 7 the job's stream. ARGV: job id, error JSON, finished_at, retention, control channel,
# control message, '1' to cancel only a queued job. Returns the state the job was in ('' when gone):
# queued: it ends `cancelled` now and its entry is dropped; running: `cancel_requested=1` and a control
# message (its worker ends it `cancelled` with its text so far); final: nothing changes.
CANCEL = Script(_FINISH_FN + _DROP_ENTRY_FN + f"""
local state = redis.call('HGET', KEYS[1], '{f.STATE}')
if not state then return '' end
if state == 'queued' then
  local entry = redis.call('HGET', KEYS[1], '{f.ENTRY_ID}')
  finish(job_keys(1), ARGV[1], 'cancelled', '', ARGV[2], ARGV[3], '', tonumber(ARGV[4]))
  drop_entry(KEYS[7], entry)
elseif state == 'running' and ARGV[7] ~= '1' then
  redis.call('HSET', KEYS[1], '{f.CANCEL_REQUESTED}', '1')
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return state
""")

# KEYS: FINISH_KEYS, 7 the job's stream. ARGV: job id, error JSON, finished_at, retention, the entry id.
# A job whose cancel was asked while it ran on a worker that died, or that handed it back before it acted on
# the cancel (RELEASE made it `queued`, the flag kept), which START answered 2 for: it ends `cancelled` with the
# text its worker published as its result, as a live worker would have ended it, and its entry is dropped.
# Returns finish's answer (0 when it was final already, -1 when it is gone).
END_CANCELLED = Script(_FINISH_FN + _DROP_ENTRY_FN + _PARTIAL_RESULT_FN + """
local written = finish(job_keys(1), ARGV[1], 'cancelled', partial_result(KEYS[1], KEYS[2]), ARGV[2], ARGV[3], '',
                       tonumber(ARGV[4]))
drop_entry(KEYS[7], ARGV[5])
return written
""")

# KEYS: FINISH_KEYS, 7 the job's stream. ARGV: job id, now, grace seconds for running jobs, retention,
# error JSON for a queued job, error JSON for a running one. Returns {the job's state after ('' when gone),
# 1 when this call ended it}: a job already `expired` reads the same, and only one caller may count it.
# A queued job past its deadline ends `expired` and its entry is dropped. A running one gets `grace` more
# for its worker to stop it and write its partial result; past that (its worker is gone or stuck) it ends
# `expired` here with the text streamed so far as its result.
EXPIRE = Script(_FINISH_FN + _DROP_ENTRY_FN + _PARTIAL_RESULT_FN + f"""
local state = redis.call('HGET', KEYS[1], '{f.STATE}')
if not state then return {{'', 0}} end
if FINAL[state] then return {{state, 0}} end
local deadline = tonumber(redis.call('HGET', KEYS[1], '{f.DEADLINE}') or '')
local now = tonumber(ARGV[2])
if not deadline then
  redis.call('ZREM', KEYS[6], ARGV[1])
  return {{state, 0}}
end
if state == 'queued' and now >= deadline then
  local entry = redis.call('HGET', KEYS[1], '{f.ENTRY_ID}')
  finish(job_keys(1), ARGV[1], 'expired', '', ARGV[5], ARGV[2], '', tonumber(ARGV[4]))
  drop_entry(KEYS[7], entry)
  return {{'expired', 1}}
end
if state == 'running' and now >= deadline + tonumber(ARGV[3]) then
  local result = partial_result(KEYS[1], KEYS[2])
  finish(job_keys(1), ARGV[1], 'expired', result, ARGV[6], ARGV[2], '', tonumber(ARGV[4]))
  return {{'expired', 1}}
end
return {{state, 0}}
""")

# KEYS: the streams to sweep. ARGV: group, consumer, min idle ms, most entries to claim.
# Returns {stream, entry id, fields, deliveries (this claim included)} per claimed entry. Streams whose
# group is gone are skipped (pcall); entries deleted from the stream are dropped by XAUTOCLAIM itself.
CLAIM_STALE = Script("""
local out, left = {}, tonumber(ARGV[4])
for _, stream in ipairs(KEYS) do
  if left <= 0 then break end
  local cursor = '0-0'
  repeat
    local r = redis.pcall('XAUTOCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', left)
    if r['err'] then break end
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      local p = redis.call('XPENDING', stream, ARGV[1], e[1], e[1], 1)
      out[#out + 1] = {stream, e[1], e[2], p[1][4]}
      left = left - 1
    end
  until cursor == '0-0' or left <= 0
end
return out
""")

# KEYS[i]: the stream of entry i. ARGV: group, consumer, then the entry ids.
# Resets the idle time of each entry still pending on this consumer; returns the ids that are not
# (acknowledged meanwhile, or claimed by another worker after our lease lapsed).
KEEP_ALIVE = Script("""
local lost = {}
for i, stream in ipairs(KEYS) do
  local id = ARGV[i + 2]
  local p = redis.call('XPENDING', stream, ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
""")

# KEYS: pairs (stream, job hash) per entry. ARGV: group, consumer, idle ms, then the entry ids.
# Hands entries still pending on this consumer back: idle past any lease, the delivery that is given
# back not counted; the job goes back to `queued` if this worker was running it. Returns how many.
RELEASE = Script(f"""
local n = 0
for i = 4, #ARGV do
  local stream, job, id = KEYS[2 * (i - 3) - 1], KEYS[2 * (i - 3)], ARGV[i]
  local p = redis.call('XPENDING', stream, ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local retry = math.max(tonumber(p[1][4]) - 1, 0)
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', retry, 'JUSTID')
    if redis.call('HGET', job, '{f.STATE}') == 'running' and redis.call('HGET', job, '{f.WORKER}') == ARGV[2] then
      redis.call('HSET', job, '{f.STATE}', 'queued')
    end
    n = n + 1
  end
end
return n
""")

# KEYS: FINISH_KEYS, 7 the entry's stream, 8 the dead-letter stream.
# ARGV: 1-7 as FINISH, 8 entry id, 9 deliveries, 10 reason, 11 dead stream max length.
# Fails the job (first final write only) and records it as dead, then drops the entry, all at once.
DEAD_LETTER = Script(_FINISH_FN + _DROP_ENTRY_FN + """
local written = finish(job_keys(1), ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
if written == 1 then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[11], '*', 'job_id', ARGV[1], 'stream', KEYS[7],
             'entry_id', ARGV[8], 'deliveries', ARGV[9], 'reason', ARGV[10])
end
drop_entry(KEYS[7], ARGV[8])
return written
""")

# KEYS[1] a tenant's stream, KEYS[2] its lane's tenant set. ARGV[1] tenant, ARGV[2] idle ms.
# 1: removed (or already gone); 0: kept (entries on it, or one added within the idle time). Atomic against
# SUBMIT, which re-adds both.
PRUNE_STREAM = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms - tonumber(string.match(last, '^(%d+)')) < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
""")

# KEYS[1] job hash; ARGV[1] a webhook attempt's JSON. Appends it to the hash's JSON list (two deliveries
# cannot lose one). Returns 1 when appended, 0 when the hash is gone.
APPEND_WEBHOOK_ATTEMPT = Script(f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], '{f.WEBHOOK_ATTEMPTS}')
if cur and cur ~= '' and cur ~= '[]' then
  cur = string.sub(cur, 1, -2) .. ',' .. ARGV[1] .. ']'
else
  cur = '[' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], '{f.WEBHOOK_ATTEMPTS}', cur)
return 1
""")
