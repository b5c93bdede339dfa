"""The feeder of one batch: it queues a bounded window of the batch's lines as jobs in the batch lane,
collects each line's result exactly once, and writes the output and error files at the end.

One feeder at a time owns a batch (a Redis lease, renewed every poll; every write that moves the batch on
checks it), and everything it knows lives in Redis, so a feeder killed at any point is replaced by another
that carries on: a line's job has a fixed id (submitting it again adds nothing), and its result is
recorded with HSETNX (recording it again changes nothing).

Back-pressure: at most `window` lines are queued or running at once, refilled as they finish, so a long
batch never stands ahead of interactive traffic in Redis while the engine always has lines to run. A
refill is sorted by prompt, so that lines sharing a prefix reach the engine together and its prefix cache
serves them; an identical deterministic line (temperature 0 or a fixed seed) runs once and the others copy
its result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from redis.asyncio.client import PubSub

from batches import keys as K
from batches import metrics
from batches import results as R
from batches.files import LineWriter, read_lines
from batches.lines import BatchLine, LineError, parse_line, without_bom
from batches.settings import BatchSettings
from batches.store import FINAL_STATUSES, batch_webhook_url
from batches.submit import RetryLater, SubmitContext, line_job_id, line_model, submit_line
from gateway.errors import ApiError, final_status
from gateway.responses import result_object
from jobstore import JobRef
from jobstore.runner import run as eval_script
from jobstore.scripts import Script
from protocol import job_record as F
from protocol import keys
from protocol.errors import error_json
from protocol.jobs import JobError, JobPayload, JobResult, JobState
from tokenq.logs import get_logger

log = get_logger(__name__)
CHUNK = 1000  # lines per Redis command when walking a whole batch
MIN_STEP_S = 0.02  # a burst of lines ending is collected in one step, not one step each
RETRY_CHECK_S = 5.0  # a line the gateway's rules held back is offered again at most this long after

RENEW = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")
RELEASE = Script("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
# KEYS: 1 batch hash, 2 lease. ARGV: 1 owner, then field/value pairs. Only the lease holder moves a batch on.
SET_FIELDS = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
""")
# KEYS: 1 batch hash, 2 lease, 3 the webhook outbox. ARGV: 1 owner, 2 '1' when the batch has a webhook, 3 the
# batch id, then field/value pairs, the final status among them. The end and its webhook in one step: no
# crash can end a batch and lose its webhook.
FINISH = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[3], '*', 'batch_id', ARGV[3], 'state', redis.call('HGET', KEYS[1], 'status'))
end
return 1
""")
# KEYS: 1 batch hash, 2 lease, 3 in-flight, 4 copies, 5 dedup. ARGV: 1 owner, 2 the cursor as read, 3 the
# new cursor, then triples (line, job id, digest or ''). Marks the lines fed; returns those that copy an
# earlier identical line (not to be submitted), or -1 when another feeder moved the batch meanwhile.
FEED = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cursor') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], 'cursor', ARGV[3])
local copies = {}
for i = 4, #ARGV, 3 do
  local leader = false
  if ARGV[i + 2] ~= '' then
    leader = redis.call('HGET', KEYS[5], ARGV[i + 2])
    if not leader then redis.call('HSET', KEYS[5], ARGV[i + 2], ARGV[i]) end
  end
  if leader then
    redis.call('HSET', KEYS[4], ARGV[i], leader)
    copies[#copies + 1] = ARGV[i]
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return copies
""")

_NOT_RUN = {JobState.expired: ("batch_expired", "the batch's completion window ended before this request "
                                                "finished"),
            JobState.cancelled: ("batch_cancelled", "the batch was cancelled before this request finished")}


class LeaseLost(Exception):
    pass


class BatchFeeder:
    def __init__(self, ctx: SubmitContext, settings: BatchSettings, owner: str, batch_id: str) -> None:
        self.ctx = ctx
        self.redis = ctx.redis
        self.settings = settings
        self.owner = owner
        self.batch_id = batch_id
        self.key = K.batch_key(batch_id)
        self.retry_at = 0.0  # a tenant limit or a missing worker said "not now" until then
        self.held_line: int | None = None  # the line that said "not now", logged once while it waits

    async def run(self, stop: asyncio.Event) -> None:
        """Work the batch until it is final, the lease is lost, or `stop`."""
        pubsub = self.redis.pubsub()
        try:
            # Each line's final state is published on its job's channel: a step follows at once.
            await pubsub.psubscribe(keys.events_pattern(f"{self.batch_id.removeprefix('batch_')}_*"))
            while not stop.is_set():
                if not await self._renew():
                    return
                try:
                    if await self.step():
                        return
                except LeaseLost:
                    return
                await self._wait(pubsub, stop)
        finally:
            with contextlib.suppress(Exception):
                await eval_script(self.redis, RELEASE, [K.lease_key(self.batch_id)], [self.owner])
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _wait(self, pubsub: PubSub, stop: asyncio.Event) -> None:
        """Until a line's job publishes its end, or poll_s passes; steps come at most every MIN_STEP_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.poll_s
        await asyncio.sleep(MIN_STEP_S)
        while not stop.is_set() and (left := deadline - loop.time()) > 0:
            if await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 0.5)) is not None:
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
                    pass  # the rest of a burst: one step collects them all
                return

    async def _renew(self) -> bool:
        ms = int(self.settings.lease_s * 1000)
        return bool(await eval_script(self.redis, RENEW, [K.lease_key(self.batch_id)], [self.owner, ms]))

    async def _set(self, **fields: Any) -> None:
        args = [self.owner, *(x for kv in fields.items() for x in (kv[0], str(kv[1])))]
        if not await eval_script(self.redis, SET_FIELDS, [self.key, K.lease_key(self.batch_id)], args):
            raise LeaseLost(self.batch_id)

    async def _finish(self, b: dict[str, str], **fields: Any) -> None:
        """Set the batch's final status (with the other fields) and queue its webhook, if it has one."""
        hook = "1" if await batch_webhook_url(self.redis, b) else "0"
        args = [self.owner, hook, self.batch_id, *(x for kv in fields.items() for x in (kv[0], str(kv[1])))]
        if not await eval_script(self.redis, FINISH, [self.key, K.lease_key(self.batch_id), keys.WEBHOOK_OUTBOX],
                                 args):
            raise LeaseLost(self.batch_id)
        metrics.BATCHES_ENDED.labels(fields["status"]).inc()

    async def step(self) -> bool:
        """One look at the batch; True once there is nothing left to do."""
        b = await self.redis.hgetall(self.key)
        if not b or b["status"] in FINAL_STATUSES:
            await self.redis.srem(K.ACTIVE_BATCHES, self.batch_id)
            return True
        if b["status"] == "validating":
            if not await self._start(b):
                return True
            b = await self.redis.hgetall(self.key)
        if b["status"] == "finalizing":
            await self._finalize(b)
            return True
        inflight, copies = await self._collect(b)
        if b["status"] == "cancelling":
            await self._stop_lines(b, "cancelled")
        elif time.time() >= float(b["expires_at"]):
            await self._stop_lines(b, "expired")
        b = await self.redis.hgetall(self.key)
        if b["status"] == "in_progress" and not b.get("ending"):
            await self._refill(b, len(inflight) + len(copies))
            b = await self.redis.hgetall(self.key)
        if int(b["cursor"]) >= int(b["total"]) and await self.redis.hlen(K.results_key(self.batch_id)) >= int(
                b["total"]):
            await self._set(status="finalizing", finalizing_at=repr(time.time()))
            await self._finalize(await self.redis.hgetall(self.key))
            return True
        return False

    async def _start(self, b: dict[str, str]) -> bool:
        if not await self.redis.exists(K.file_key(b["input_file_id"])):
            now = repr(time.time())
            await self._finish(b, status="failed", failed_at=now, errors=json.dumps([{
                "code": "input_file_missing", "line": None, "param": "input_file_id",
                "message": f"input file {b['input_file_id']} was deleted before the batch started"}]))
            await self._retire()
            return False
        await self._set(status="in_progress", in_progress_at=repr(time.time()))
        log.info("batch started", batch_id=self.batch_id, lines=b["total"], tenant=b["tenant"])
        return True

    # -- results -------------------------------------------------------------------------------------

    async def _record(self, records: list[tuple[int, tuple[str, str]]]) -> None:
        ks = [K.results_key(self.batch_id), self.key, K.inflight_key(self.batch_id), K.copies_key(self.batch_id)]
        for start in range(0, len(records), CHUNK):
            args = [x for line, (kind, text) in records[start:start + CHUNK]
                    for x in (line, kind, text, *R.usage_of(kind, text))]
            outputs, errors = await eval_script(self.redis, R.RECORD, ks, args)
            metrics.LINES.labels("output").inc(outputs)
            metrics.LINES.labels("error").inc(errors)

    async def _custom_ids(self, b: dict[str, str], lines: list[int]) -> list[str | None]:
        texts = await read_lines(self.redis, b["input_file_id"], lines)
        return [_custom_id(t) for t in texts]

    async def _collect(self, b: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Record the lines whose jobs are final and the copies whose original is; resubmit lines whose job
        is not in Redis (a feeder died between marking and submitting, or a limit said 'not now')."""
        inflight = await self.redis.hgetall(K.inflight_key(self.batch_id))
        lines = sorted(inflight, key=int)
        async with self.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.hget(keys.job_key(inflight[line]), F.STATE)
            states = await pipe.execute()
        done = [int(line) for line, s in zip(lines, states, strict=True) if s and JobState(s).final]
        missing = [int(line) for line, s in zip(lines, states, strict=True) if s is None]
        records = []
        if done:
            custom_ids = await self._custom_ids(b, done)
            async with self.redis.pipeline(transaction=False) as pipe:
                for line in done:
                    pipe.hmget(keys.job_key(inflight[str(line)]), [F.STATE, F.RESULT, F.ERROR, F.PAYLOAD,
                                                                   F.CREATED_AT])
                rows = await pipe.execute()
            for line, custom_id, row in zip(done, custom_ids, rows, strict=True):
                records.append((line, _job_outcome(custom_id, inflight[str(line)], *row,
                                                   ending=batch_ending(b, time.time()))))
        copies = await self.redis.hgetall(K.copies_key(self.batch_id))
        if copies:
            followers = sorted(copies, key=int)
            stored = await self.redis.hmget(K.results_key(self.batch_id), [copies[f] for f in followers])
            ready = [(int(f), s) for f, s in zip(followers, stored, strict=True) if s is not None]
            custom_ids = await self._custom_ids(b, [f for f, _ in ready])
            records += [(f, R.with_custom_id(s, c or "")) for (f, s), c in zip(ready, custom_ids, strict=True)]
        await self._record(records)
        recorded = {line for line, _ in records}
        if missing and b["status"] == "in_progress" and not b.get("ending") and time.time() >= self.retry_at:
            texts = await read_lines(self.redis, b["input_file_id"], missing)
            await self._submit(b, [(i, t) for i, t in zip(missing, texts, strict=True)])
        return ({k: v for k, v in inflight.items() if int(k) not in recorded},
                {k: v for k, v in copies.items() if int(k) not in recorded})

    # -- feeding --------------------------------------------------------------------------------------

    async def _refill(self, b: dict[str, str], busy: int) -> None:
        cursor, total = int(b["cursor"]), int(b["total"])
        n = min(self.settings.window - busy, total - cursor)
        # A refill waits for `refill` free places (sorted as a group, for the prefix cache), never for more
        # than the window has: a window below `refill` would otherwise never be refilled at all.
        smallest = min(self.settings.refill, self.settings.window)
        if n <= 0 or (n < smallest and n < total - cursor) or time.time() < self.retry_at:
            return
        texts = await read_lines(self.redis, b["input_file_id"], range(cursor, cursor + n))
        parsed = [(cursor + i, _parse(t, cursor + i)) for i, t in enumerate(texts)]
        parsed.sort(key=lambda p: (p[1].prompt_key() if isinstance(p[1], BatchLine) else "", p[0]))
        args = [self.owner, str(cursor), str(cursor + n)]
        for line, item in parsed:
            digest = item.dedup_digest() if isinstance(item, BatchLine) else None
            args += [line, line_job_id(self.batch_id, line, line_model(item)), digest or ""]
        ks = [self.key, K.lease_key(self.batch_id), K.inflight_key(self.batch_id), K.copies_key(self.batch_id),
              K.dedup_key(self.batch_id)]
        copied = await eval_script(self.redis, FEED, ks, args)
        if copied == -1:
            raise LeaseLost(self.batch_id)
        skip = {int(c) for c in copied}
        await self._submit(b, [(line, item) for line, item in parsed if line not in skip])

    async def _submit(self, b: dict[str, str], lines: list[tuple[int, Any]]) -> None:
        """Submit each line's job in the given order; a line that can never run is recorded as an error."""
        tenant = await self.ctx.auth.tenant(b["tenant"])
        deadline = float(b["expires_at"])
        records = []
        items = [(line, _parse(item, line) if isinstance(item, str | None) else item) for line, item in lines]
        # Resubmitted lines too go in prompt order (a refill's already are; the sort is stable).
        items.sort(key=lambda p: p[1].prompt_key() if isinstance(p[1], BatchLine) else "")
        for line, item in items:
            job_id = line_job_id(self.batch_id, line, line_model(item))
            if isinstance(item, LineError):
                (custom_id,) = await self._custom_ids(b, [line])
                records.append((line, R.refused(custom_id or "", job_id, 400,
                                                error_json(str(item), "invalid_request_error")["error"])))
                continue
            try:
                await submit_line(self.ctx, tenant, self.batch_id, line, item, deadline)
            except RetryLater as e:
                retry_after = float((e.error.headers or {}).get("Retry-After", 1))
                self.retry_at = time.time() + min(retry_after, RETRY_CHECK_S)
                # Asked again every RETRY_CHECK_S (a queue may drain sooner than a limit's Retry-After says):
                # one line when a line starts to wait, not one per ask.
                (log.debug if line == self.held_line else log.info)(
                    "batch line not admitted yet", batch_id=self.batch_id, line=line, reason=e.error.message)
                self.held_line = line
                break
            except ApiError as e:
                records.append((line, R.refused(item.custom_id, job_id, e.status,
                                                error_json(e.message, e.type, e.param, e.code)["error"])))
            self.held_line = None
        await self._record(records)

    # -- ending ---------------------------------------------------------------------------------------

    async def _stop_lines(self, b: dict[str, str], ending: str) -> None:
        """Cancelled or past its window: no more lines are fed, those not fed yet end as errors, and the jobs
        queued or running are cancelled. An expired batch ends its in-flight lines now; a cancelled one
        lets them report (most end `cancelled` at once) for up to cancel_grace_s."""
        ending = b.get("ending") or ending  # the first reason to stop is the batch's end
        code, message = _NOT_RUN[JobState(ending)]
        if not b.get("ending"):
            await self._set(ending=ending)
        cursor, total = int(b["cursor"]), int(b["total"])
        if cursor < total:  # (again after a feeder died half way through this)
            for start in range(cursor, total, CHUNK):
                lines = list(range(start, min(total, start + CHUNK)))
                custom_ids = await self._custom_ids(b, lines)
                await self._record([(line, R.not_run(c or "", code, message))
                                    for line, c in zip(lines, custom_ids, strict=True)])
            await self._set(cursor=total)
        if not b.get("stopped"):
            inflight = await self.redis.hgetall(K.inflight_key(self.batch_id))
            never_queued = []  # a limit held them back: nothing runs them, so they end now, not after the grace
            for line, job_id in inflight.items():
                model = await self.redis.hget(keys.job_key(job_id), F.MODEL)
                if model:
                    await self.ctx.store.cancel(JobRef(job_id, b["tenant"], model, "batch"))
                else:
                    never_queued.append(int(line))
            custom_ids = await self._custom_ids(b, never_queued)
            await self._record([(line, R.not_run(c or "", code, message))
                                for line, c in zip(never_queued, custom_ids, strict=True)])
            await self._set(stopped="1")
            log.info("batch stopping", batch_id=self.batch_id, ending=ending, not_fed=total - cursor,
                     in_flight=len(inflight))
        since = float(b.get("cancelling_at") or b["expires_at"])
        if ending == "expired" or time.time() >= since + self.settings.cancel_grace_s:
            left = {**await self.redis.hgetall(K.inflight_key(self.batch_id)),
                    **await self.redis.hgetall(K.copies_key(self.batch_id))}
            lines = sorted(int(line) for line in left)
            custom_ids = await self._custom_ids(b, lines)
            await self._record([(line, R.not_run(c or "", code, message))
                                for line, c in zip(lines, custom_ids, strict=True)])

    async def _finalize(self, b: dict[str, str]) -> None:
        """Write the output and error files from the recorded results, in line order (again from the
        start if a feeder died half way), then end the batch."""
        hexid = self.batch_id.removeprefix("batch_")
        out = LineWriter(self.redis, self.settings, f"file-{hexid}-output")
        err = LineWriter(self.redis, self.settings, f"file-{hexid}-errors")
        await out.discard()
        await err.discard()
        total = int(b["total"])
        for start in range(0, total, CHUNK):
            lines = list(range(start, min(total, start + CHUNK)))
            stored = await self.redis.hmget(K.results_key(self.batch_id), lines)
            for line, s in zip(lines, stored, strict=True):
                if s is None:  # cannot happen while the results hash is intact; never lose the line
                    (custom_id,) = await self._custom_ids(b, [line])
                    s = "".join(R.not_run(custom_id or "", "batch_failed", "the request's result was lost"))
                await (out if s[0] == R.OUTPUT else err).add(s[1:])
        now = time.time()
        ending = b.get("ending") or "completed"
        fields: dict[str, Any] = {"status": ending, f"{ending}_at": repr(now)}
        for writer, name in ((out, "output"), (err, "errors")):
            if writer.lines:
                await writer.commit(b["tenant"], f"{self.batch_id}_{name}.jsonl", "batch_output")
                fields["output_file_id" if name == "output" else "error_file_id"] = writer.file_id
        await self._finish(b, **fields)
        await self._retire()
        log.info("batch ended", batch_id=self.batch_id, status=ending, completed=b.get("completed"),
                 failed=b.get("failed"))

    async def _retire(self) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(K.ACTIVE_BATCHES, self.batch_id)
            pipe.delete(*[k for k in K.batch_keys(self.batch_id) if k != K.lease_key(self.batch_id)])
            pipe.expire(self.key, self.settings.batch_retention_s)
            await pipe.execute()


def _parse(text: str | None, line: int) -> BatchLine | LineError:
    if text is None:
        return LineError(line + 1, "the input file was deleted while the batch ran")
    try:
        return parse_line(text, line + 1)
    except LineError as e:
        return e


def _custom_id(text: str | None) -> str | None:
    try:
        return json.loads(without_bom(text))["custom_id"] if text is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def batch_ending(b: dict[str, str], now: float) -> str | None:
    """The batch's end as its lines' outcomes see it: the one recorded, else `expired` once the window has
    passed. A line's job has the window's end for its deadline, so it may end `expired` before the feeder's
    loop records the batch's end: that line is `batch_expired`, as the lines the end stopped are."""
    return b.get("ending") or ("expired" if now >= float(b["expires_at"]) else None)


def _job_outcome(custom_id: str | None, job_id: str, state: str | None, result: str | None, error: str | None,
                 payload: str | None, created_at: str | None, ending: str | None = None) -> tuple[str, str]:
    """A final job's line of the output or error file. A job the batch's end stopped (`ending`: the batch is
    cancelled or past its window) is a line the batch did not finish; one cancelled or expired on its own
    (DELETE /v1/jobs/{id}, the line's `ttl`) is answered as the waiting route answers it, 409 or 504 with
    the job's error (its partial text stays on the job, `request_id`)."""
    custom_id = custom_id or ""
    job_state = JobState(state) if state else JobState.failed
    if job_state == JobState.succeeded and result and payload:
        p = JobPayload.model_validate_json(payload)
        body = result_object(p.kind, job_id, p.model, int(float(created_at or 0)),
                             JobResult.model_validate_json(result), want_logprobs=p.sampling.logprobs is not None)
        return R.succeeded(custom_id, job_id, body)
    if job_state in _NOT_RUN and ending:
        return R.not_run(custom_id, *_NOT_RUN[JobState(ending)])
    err = (JobError.model_validate_json(error) if error else
           JobError(type="server_error", message=f"the job ended {job_state.value}"))
    return R.refused(custom_id, job_id, final_status(job_state, err.type), error_json(err.message, err.type)["error"])
