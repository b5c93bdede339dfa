"""Cancelling a job. One Lua script reads the state and acts on it atomically, so a worker that starts
the job at the same moment is handled either way:

- queued: the job ends `cancelled` through the shared FINISH_JOB (first final write wins, the tenant's
  queued count goes down, a webhook is queued) and its stream entry is deleted;
- running: `cancel_requested=1` is set and a control message published; the worker polls the flag and
  ends the job `cancelled` itself, with the text it had so far;
- final already: nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis

from gateway.jobs import job_stream
from gateway.logging import get_logger
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobError
from protocol.scripts import FINISH_JOB, finish_keys

log = get_logger(__name__)

# KEYS: 1-3 as FINISH_JOB (job hash, tenant's queued counter, webhook outbox), 4 the job's stream.
# ARGV: 1-9 as FINISH_JOB, 10 the control channel, 11 the control message.
# Returns the state the job was in ('' when the hash is gone).
CANCEL_LUA = f"""
local function finish_job()
{FINISH_JOB}
end
local state = redis.call('HGET', KEYS[1], '{F.STATE}')
if not state then return '' end
if state == 'queued' then
  finish_job()
  local entry = redis.call('HGET', KEYS[1], '{F.ENTRY_ID}')
  if entry then
    redis.call('XACK', KEYS[4], '{keys.GROUP}', entry)
    redis.call('XDEL', KEYS[4], entry)
  end
elseif state == 'running' then
  redis.call('HSET', KEYS[1], '{F.CANCEL_REQUESTED}', '1')
  redis.call('PUBLISH', ARGV[10], ARGV[11])
end
return state
"""

CANCELLED_ERROR = JobError(type="cancelled", message="the job was cancelled")


class Canceller:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(CANCEL_LUA)
        self._detached: set[asyncio.Task] = set()

    async def cancel(self, job_id: str, tenant: str, model: str, lane: str, text: str = "") -> str:
        """Cancel a job of `tenant`; returns the state it was in before ('' when it is gone)."""
        return await self._script(
            keys=[*finish_keys(job_id, tenant), job_stream(model, lane, tenant)],
            args=[keys.events_channel(job_id), "cancelled", F.ERROR, CANCELLED_ERROR.model_dump_json(),
                  repr(time.time()), text, F.RETENTION_SECONDS, "", job_id,
                  keys.CONTROL_CHANNEL, json.dumps({"cancel": job_id})])

    def cancel_detached(self, job_id: str, tenant: str, model: str, lane: str) -> None:
        """Cancel from a place that is itself being cancelled (a streaming response whose client left)."""
        task = asyncio.get_running_loop().create_task(self._cancel_logged(job_id, tenant, model, lane))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _cancel_logged(self, job_id: str, tenant: str, model: str, lane: str) -> None:
        try:
            was = await self.cancel(job_id, tenant, model, lane)
            log.info("client disconnected; job cancelled", job_id=job_id, was=was)
        except Exception as e:  # Redis down: the job runs on; nothing else to do here
            log.warning("could not cancel the job of a disconnected client", job_id=job_id, error=repr(e))
