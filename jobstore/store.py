"""The job store: one typed API over the scripts in jobstore/scripts.py, used by gateway and worker alike.
Every write to a job goes through here; callers never name a script or a key list."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from redis.exceptions import ResponseError

from jobstore import runner
from jobstore import scripts as s
from jobstore.connect import AnyRedis, is_cluster
from jobstore.runner import ScriptClient
from protocol import choice_text, keys
from protocol import job_record as F
from protocol.jobs import JobError, JobPayload, JobState
from protocol.outage import is_redis_oom

IDEMPOTENCY_TTL_S = 86400
RATE_WINDOW_S = 60
NEW_TENANTS_MAXLEN = 100  # a wake-up is read at once or not at all; the stream keeps only the latest
EXPIRE_RUNNING_GRACE_S = 0.5  # a running job's worker gets this long past the deadline to write it itself
DEADLINE_EXCEEDED_QUEUED = JobError(type="deadline_exceeded", message="the job expired before it started")
DEADLINE_EXCEEDED_RUNNING = JobError(type="deadline_exceeded", message="the job ran past its deadline")
CANCELLED = JobError(type="cancelled", message="the job was cancelled")


@dataclass(frozen=True)
class JobRef:
    """What names every key of one job: its id, and the tenant, model and lane it was queued for."""

    id: str
    tenant: str
    model: str
    lane: str

    @classmethod
    def of(cls, payload: JobPayload) -> JobRef:
        return cls(payload.id, payload.tenant, payload.model, payload.lane)

    @classmethod
    def of_record(cls, job_id: str, record: dict[str, str]) -> JobRef:
        return cls(job_id, record.get(F.TENANT, "default"), record.get(F.MODEL, ""), record.get(F.LANE, "default"))

    @property
    def stream(self) -> str:
        return keys.jobs_stream(self.model, self.lane, self.tenant)

    def finish_keys(self) -> list[str]:
        """The keys a final write touches, in the order of scripts.FINISH_KEYS (one slot: the model's)."""
        return [keys.job_key(self.id), keys.job_text_key(self.id), keys.tenant_queued_key(self.tenant, self.model),
                keys.lane_depth_key(self.model, self.lane), keys.webhook_outbox(self.model),
                keys.deadlines_key(self.model)]


@dataclass(frozen=True)
class Limits:
    """A tenant's admission limits; 0 is no limit."""

    rpm: int = 0
    tpm: int = 0
    max_queued: int = 0
    max_depth: int = 0  # of the job's lane, shared fairly by the tenants with jobs in it


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's Idempotency-Key and the digest of the request it came with, both kept in the job's hash:
    a repeat of the key is answered with this job only when it carries the same request."""

    key: str
    request_digest: str

    def fields(self) -> dict[str, str]:
        return {F.IDEMPOTENCY_KEY: self.key, F.REQUEST_DIGEST: self.request_digest}


class Refused(Exception):  # noqa: N818 (a decision, not a failure)
    """Admission said no: `limit` is rpm, tpm, max_queued or queue_full."""

    def __init__(self, limit: str, wait_ms: int, used: int, value: int) -> None:
        super().__init__(f"{limit}: used {used}, limit {value}")
        self.limit = limit
        self.wait_ms = wait_ms
        self.used = used
        self.value = value  # the limit's value (for queue_full: the tenant's fair share)

    @classmethod
    def of_reply(cls, reply: list) -> Refused:
        """From an admission script's refusal, {2, limit, wait ms, used, limit's value}."""
        return cls(reply[1], int(reply[2]), int(reply[3]), int(reply[4]))


@dataclass(frozen=True)
class Submitted:
    job_id: str  # the job admitted, or for a repeated Idempotency-Key the first job
    created_at: float
    repeat: bool = False


@dataclass(frozen=True)
class Started:
    code: int  # 1 started, 0 already final, -1 gone, 2 cancelled while its worker died (end_cancelled)
    streamed: bool = False
    seq: int = 0


@dataclass(frozen=True)
class DeltaWrite:
    job_id: str
    text: str  # the new text only: it is appended
    seq: int
    event_json: str
    first_token_at: str = ""
    output_tokens: int = 0  # the job's output tokens with this delta's, every choice's


@dataclass(frozen=True)
class FinalWrite:
    ref: JobRef
    state: str
    result_json: str = ""
    error_json: str = ""
    finished_at: float = 0.0
    first_token_at: str = ""

    def args(self) -> list[str | int]:
        return [self.ref.id, self.state, self.result_json, self.error_json, repr(self.finished_at or time.time()),
                self.first_token_at, F.RETENTION_SECONDS]


class JobStore:
    """`redis` is a redis-py client (decode_responses=True); `scripts`, when given, sends the hot single
    script calls instead, the submission's, a step's deltas' and a follower's snapshot (a process's shared
    pipelined connection, jobstore/pipe.py). `on_ended`, when given, hears of each job that this store's
    `cancel` or `expire` moved to its final state (the gateway counts them): the scripts say whether the
    call ended the job, so a job is heard of once however many gateways race for it."""

    def __init__(self, redis: AnyRedis, scripts: ScriptClient | None = None,
                 on_ended: Callable[[JobRef, JobState], None] | None = None) -> None:
        self.redis = redis
        self.cluster = is_cluster(redis)
        self._scripts: AnyRedis | ScriptClient = scripts if scripts is not None else redis
        self._on_ended = on_ended

    # -- submission --------------------------------------------------------------------------------------

    async def submit(self, payload: JobPayload, request_json: str, metadata: dict[str, str], streamed: bool,
                     limits: Limits = Limits(), idempotency: IdempotencyKey | None = None,
                     now: float | None = None) -> Submitted:
        """Admit and write a job in one script: limits, the lane's fair share, the Idempotency-Key, the
        stream entry, the job hash, the counters. Raises Refused."""
        now = time.time() if now is None else now
        minute, into = divmod(now, RATE_WINDOW_S)
        tenant = payload.tenant
        record = {
            F.STATE: JobState.queued.value, F.TENANT: tenant, F.MODEL: payload.model, F.LANE: payload.lane,
            F.REQUEST: request_json, F.METADATA: json.dumps(metadata), F.CREATED_AT: repr(now), F.SEQ: "0",
            F.ATTEMPTS: "0", F.STREAMED: "1" if streamed else "0",
        }
        idempotency_key = None if idempotency is None else idempotency.key
        if idempotency is not None:
            record.update(idempotency.fields())
        if payload.webhook_url:
            record[F.WEBHOOK_URL] = payload.webhook_url
        if payload.sampling.n > 1:
            record[F.CHOICES] = str(payload.sampling.n)
        ref = JobRef.of(payload)
        model = payload.model
        if keys.job_shard(payload.id) != keys.shard(model):
            raise ValueError(f"job id {payload.id!r} does not carry the shard of model {model!r}")

        def counter(limit: str, minute: int) -> str:
            return keys.tenant_counter_key(tenant, model, limit, minute)

        reply = await runner.run(
            self._scripts, s.SUBMIT,
            [keys.job_key(payload.id), keys.idem_key(tenant, idempotency_key or "", model),
             counter("rpm", int(minute)), counter("rpm", int(minute) - 1),
             counter("tpm", int(minute)), counter("tpm", int(minute) - 1),
             keys.tenant_queued_key(tenant, model), ref.stream, keys.lane_tenants_key(model, payload.lane),
             keys.lane_depth_key(model, payload.lane), keys.deadlines_key(model)],
            [payload.id, "1" if idempotency_key is not None else "0", IDEMPOTENCY_TTL_S, limits.rpm, limits.tpm,
             payload.cost_tokens, limits.max_queued, repr(into / RATE_WINDOW_S),
             RATE_WINDOW_S, limits.max_depth, tenant, payload.model_dump_json(),
             repr(payload.deadline) if payload.deadline is not None else "",
             *(item for pair in record.items() for item in pair)])
        code = int(reply[0])
        if code == 2:
            raise Refused.of_reply(reply)
        if code == 0 and reply[1] != payload.id:
            return Submitted(reply[1], now, repeat=True)
        if code == 1 and int(reply[2]):  # a new stream: wake a worker blocked on the streams it knows
            await self.redis.xadd(keys.new_tenants_stream(payload.model), {"lane": payload.lane, "tenant": tenant},
                                  maxlen=NEW_TENANTS_MAXLEN, approximate=True)
        return Submitted(payload.id, now)

    async def refund(self, payload: JobPayload, admitted_at: float, limits: Limits, tokens: bool = True) -> None:
        """Give back what a job admitted at `admitted_at` counted against its tenant's rpm (and, with
        `tokens`, tpm): a request withdrawn after some of its jobs were admitted counts towards no limit."""
        minute = int(admitted_at // RATE_WINDOW_S)
        tenant, model = payload.tenant, payload.model
        await runner.run(
            self._scripts, s.REFUND,
            [keys.tenant_counter_key(tenant, model, "rpm", minute), keys.tenant_counter_key(tenant, model, "tpm", minute)],
            [1 if limits.rpm > 0 else 0, payload.cost_tokens if tokens and limits.tpm > 0 else 0])

    async def write_finished(self, job_id: str, model: str, tenant: str, record: dict[str, str],
                             idempotency: IdempotencyKey | None, webhook: bool, rpm: int = 0,
                             now: float | None = None) -> str:
        """Write a job that is final from its start (a response-cache hit): one request against the tenant's
        rpm, its hash, its webhook on the outbox, its Idempotency-Key bound, in one script. Returns the job
        that holds the key: this one, or the one a request with the same key made before (then nothing is
        written). Raises Refused past the rpm."""
        minute, into = divmod(time.time() if now is None else now, RATE_WINDOW_S)
        idempotency_key = None if idempotency is None else idempotency.key
        if idempotency is not None:
            record = {**record, **idempotency.fields()}
        reply = await runner.run(
            self._scripts, s.WRITE_FINISHED,
            [keys.job_key(job_id), keys.idem_key(tenant, idempotency_key or "", model), keys.webhook_outbox(model),
             keys.tenant_counter_key(tenant, model, "rpm", int(minute)),
             keys.tenant_counter_key(tenant, model, "rpm", int(minute) - 1)],
            [job_id, "1" if idempotency_key is not None else "0", IDEMPOTENCY_TTL_S, F.RETENTION_SECONDS,
             "1" if webhook else "0", rpm, repr(into / RATE_WINDOW_S), RATE_WINDOW_S,
             *(item for pair in record.items() for item in pair)])
        if int(reply[0]) == 2:
            raise Refused.of_reply(reply)
        return reply[1]

    async def attach(self, ref: JobRef, idempotency_key: str) -> int:
        """One more client waits on a completion's job (a repeat of its key): 1; 0 when the job is final or
        gone; -1 when the key no longer maps to it (its last client left: submit again)."""
        return int(await runner.run(self._scripts, s.ATTACH,
                                    [keys.job_key(ref.id), keys.idem_key(ref.tenant, idempotency_key, ref.model)],
                                    [ref.id]))

    async def leave(self, ref: JobRef, idempotency_key: str | None) -> bool:
        """A waiting client left: True when it was the last one of a job not yet final (cancel it now; its
        key is already released)."""
        return bool(await runner.run(
            self._scripts, s.LEAVE, [keys.job_key(ref.id), keys.idem_key(ref.tenant, idempotency_key or "", ref.model)],
            [ref.id, "1" if idempotency_key is not None else "0"]))

    async def release_idempotency_key(self, tenant: str, key: str, model: str, job_id: str) -> None:
        """Unbind a key that still maps to `job_id` (whose job is gone), so that a retry goes through."""
        await runner.run(self.redis, s.RELEASE_IDEMPOTENCY_KEY, [keys.idem_key(tenant, key, model)], [job_id])

    # -- reads -------------------------------------------------------------------------------------------

    async def read(self, job_id: str) -> dict[str, str] | None:
        """The job's hash with its streamed text under F.TEXT, or None when it is gone: one script reads both
        keys (one slot) at one instant, on a cluster too, and while Redis is full (Redis 7 refuses every
        command queued in a MULTI then, reads included)."""
        flat, text = await runner.run(self.redis, s.READ, [keys.job_key(job_id), keys.job_text_key(job_id)], [])
        record = dict(zip(flat[::2], flat[1::2], strict=True))
        if not record:
            return None
        if text:
            record[F.TEXT] = text
        return record

    async def snapshot(self, job_id: str) -> tuple[str | None, list[str], int, str | None, str | None]:
        """(state, each choice's text, seq, result JSON, error JSON), read at one instant: one script, which
        costs a follower (every streamed request) less CPU than a MULTI through redis-py (docs/BENCHMARKS.md)."""
        fields = [F.STATE, F.SEQ, F.RESULT, F.ERROR, F.CHOICES]
        values, text = await runner.run(self._scripts, s.SNAPSHOT, [keys.job_key(job_id), keys.job_text_key(job_id)],
                                        fields)
        state, seq, result, error, choices = (v or None for v in values)  # Lua's nil arrives as False
        return state, choice_text.split(text or "", int(choices or 1)), int(seq or 0), result, error

    async def read_current(self, job_id: str, now: float | None = None) -> dict[str, str] | None:
        """As `read`, with a deadline that has passed applied first (the job then reads `expired`)."""
        record = await self.read(job_id)
        if record is None or not _past_deadline(record, now):
            return record
        await self.expire(JobRef.of_record(job_id, record), now)
        return await self.read(job_id)

    async def depth(self, model: str) -> dict[str, int]:
        """Jobs queued or running per lane of `model`, over every tenant (the counters admission uses)."""
        pipe = self.redis.pipeline(transaction=False)
        for lane in keys.LANES:
            pipe.hvals(keys.lane_depth_key(model, lane))
        return {lane: sum(int(v) for v in vals) for lane, vals in zip(keys.LANES, await pipe.execute(), strict=True)}

    async def known_models(self) -> set[str]:
        return set(await self.redis.smembers(keys.MODELS_SET))

    # -- the worker's writes ----------------------------------------------------------------------------

    async def mark_streamed(self, job_id: str) -> None:
        """Ask the worker to publish deltas (it re-reads this flag while the job runs)."""
        await runner.run(self.redis, s.MARK_STREAMED, [keys.job_key(job_id)], [])

    async def start(self, job_ids: Sequence[str], started_at: float, worker: str) -> list[Started]:
        """Mark jobs running on `worker` (one script for all of them, on the store's script connection: a
        new job's first output waits for its answer)."""
        if not job_ids:
            return []
        job_keys = [k for j in job_ids for k in (keys.job_key(j), keys.job_text_key(j))]
        rows = await runner.run(self._scripts, s.START, job_keys, [repr(started_at), worker])
        return [Started(int(r[0]), r[1] == "1", int(r[2])) if int(r[0]) == 1 else Started(int(r[0])) for r in rows]

    async def write(self, deltas: Sequence[DeltaWrite], finals: Sequence[FinalWrite]) -> list:
        """One MULTI: the deltas (appended, one script call for all), then the final writes (deltas alone: the
        one script call). Returns each final write's answer (1 first, 0 already final, -1 gone) or its error;
        a full Redis's refusal of the deltas is raised (redis-py raises one that aborts the MULTI itself)."""
        rows = [[d.job_id, d.text, d.seq, d.event_json, d.first_token_at, d.output_tokens] for d in deltas]
        delta_keys = [k for d in deltas for k in (keys.job_key(d.job_id), keys.job_text_key(d.job_id))]
        rows_json = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        if not finals and not self.cluster:
            # Deltas alone (every step of a stream but its last) are one script, atomic by itself: a bare
            # EVALSHA, not MULTI/EVALSHA/EXEC through a pipeline, on each token's way to its reader.
            if rows:
                try:
                    await runner.run(self._scripts, s.APPEND_DELTAS, delta_keys, [rows_json])
                except ResponseError as e:  # as in the MULTI: a failed append is not raised, but a full
                    if is_redis_oom(e):     # Redis is (the caller retries: the script skips rows it has)
                        raise
            return []

        def fill(pipe) -> None:
            if rows:
                runner.queue(pipe, s.APPEND_DELTAS, delta_keys, [rows_json])
            for final in finals:
                runner.queue(pipe, s.FINISH, final.ref.finish_keys(), final.args())

        # A cluster sends them one by one, deltas first: each script is atomic and all share one slot
        # (one worker's jobs are one model's).
        replies = await runner.pipeline(self.redis, fill, transaction=True, raise_on_error=False)
        if rows and is_redis_oom(replies[0]):  # a full Redis refused the deltas: raised, as an outage is, for
            raise replies[0]                   # the caller to retry (a final refused so is its own answer)
        return replies[1 if rows else 0:]

    async def finish_entry(self, final: FinalWrite, stream: str, entry_id: str) -> int:
        """The final write of a job that never reached the engine, and its entry dropped, at once."""
        return int(await runner.run(self.redis, s.FINISH_ENTRY, [*final.ref.finish_keys(), stream],
                                    [*final.args(), entry_id]))

    async def end_cancelled(self, ref: JobRef, stream: str, entry_id: str) -> int:
        """Ends a job that `start` answered 2 for: `cancelled`, with the text published before its worker
        died, and its entry dropped."""
        return int(await runner.run(self.redis, s.END_CANCELLED, [*ref.finish_keys(), stream],
                                    [ref.id, CANCELLED.model_dump_json(), repr(time.time()), F.RETENTION_SECONDS,
                                     entry_id]))

    async def ack(self, entries: Iterable[tuple[str, str]]) -> None:
        """Acknowledge and delete (stream, entry id) pairs."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in entries:
            pipe.xack(stream, keys.GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        if len(pipe):
            await pipe.execute()

    # -- cancel and expiry -------------------------------------------------------------------------------

    async def cancel(self, ref: JobRef, only_queued: bool = False, error: JobError = CANCELLED) -> str:
        """Cancel a job (with `only_queued`, only if no worker has started it), recording `error`; returns
        the state it was in ('' when it is gone). Only a queued job ends here; a running one its worker ends."""
        was = await runner.run(self.redis, s.CANCEL, [*ref.finish_keys(), ref.stream],
                               [ref.id, error.model_dump_json(), repr(time.time()), F.RETENTION_SECONDS,
                                keys.control_channel(ref.model), json.dumps({"cancel": ref.id}),
                                "1" if only_queued else "0"])
        if was == JobState.queued.value and self._on_ended is not None:
            self._on_ended(ref, JobState.cancelled)
        return was

    async def expire(self, ref: JobRef, now: float | None = None, grace_s: float = EXPIRE_RUNNING_GRACE_S) -> str:
        """Apply the job's deadline: its state after ('' when gone)."""
        now = time.time() if now is None else now
        state, ended = await runner.run(self.redis, s.EXPIRE, [*ref.finish_keys(), ref.stream],
                                        [ref.id, repr(now), grace_s, F.RETENTION_SECONDS,
                                         DEADLINE_EXCEEDED_QUEUED.model_dump_json(),
                                         DEADLINE_EXCEEDED_RUNNING.model_dump_json()])
        if int(ended) and self._on_ended is not None:
            self._on_ended(ref, JobState.expired)
        return state

    async def expire_due(self, now: float | None = None, limit: int = 500,
                         grace_s: float = EXPIRE_RUNNING_GRACE_S) -> int:
        """One pass of the expiry sweep over every known model's deadlines set; returns how many jobs it
        expired (at most `limit` a model)."""
        now = time.time() if now is None else now
        expired = 0
        for model in sorted(await self.known_models()):
            expired += await self._expire_due(model, now, limit, grace_s)
        return expired

    async def _expire_due(self, model: str, now: float, limit: int, grace_s: float) -> int:
        deadlines = keys.deadlines_key(model)
        due = await self.redis.zrangebyscore(deadlines, "-inf", repr(now), start=0, num=limit)
        if not due:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in due:
            pipe.hmget(keys.job_key(job_id), [F.TENANT, F.MODEL, F.LANE])
        refs = []
        gone = []
        for job_id, (tenant, model, lane) in zip(due, await pipe.execute(), strict=True):
            if tenant is None:
                gone.append(job_id)
            else:
                refs.append(JobRef(job_id, tenant, model or "", lane or "default"))
        if gone:
            await self.redis.zrem(deadlines, *gone)
        expired = 0
        for ref in refs:
            if await self.expire(ref, now, grace_s) == JobState.expired.value:
                expired += 1
        return expired

    # -- recovery and housekeeping ----------------------------------------------------------------------

    async def claim_stale(self, streams: Sequence[str], consumer: str, idle_ms: int, room: int) -> list:
        """[stream, entry id, flat fields, deliveries] per entry idle past `idle_ms`, at most `room`."""
        return await runner.run(self.redis, s.CLAIM_STALE, streams, [keys.GROUP, consumer, idle_ms, room])

    async def keep_alive(self, entries: Sequence[tuple[str, str]], consumer: str) -> list[str]:
        """Reset the idle time of our pending (stream, entry id)s; returns the ids no longer ours."""
        if not entries:
            return []
        return await runner.run(self.redis, s.KEEP_ALIVE, [st for st, _ in entries],
                                [keys.GROUP, consumer, *(e for _, e in entries)])

    async def release(self, entries: Sequence[tuple[str, str, str]], consumer: str, idle_ms: int) -> int:
        """Hand (stream, entry id, job id)s back to the group, claimable at once; returns how many."""
        if not entries:
            return 0
        pairs = [k for st, _, job_id in entries for k in (st, keys.job_key(job_id))]
        return int(await runner.run(self.redis, s.RELEASE, pairs,
                                    [keys.GROUP, consumer, idle_ms, *(e for _, e, _ in entries)]))

    async def dead_letter(self, final: FinalWrite, stream: str, entry_id: str, deliveries: int, reason: str,
                          max_len: int) -> int:
        """Fail the job (first final write only), record it on the dead-letter stream, drop the entry."""
        return int(await runner.run(self.redis, s.DEAD_LETTER,
                                    [*final.ref.finish_keys(), stream, keys.dead_stream(final.ref.model)],
                                    [*final.args(), entry_id, deliveries, reason, max_len]))

    async def prune_streams(self, lane_set: str, tenants: Sequence[str], streams: Sequence[str],
                            idle_ms: int) -> list:
        """PRUNE_STREAM on each stream, in one round trip; 1 where the stream went."""
        def fill(pipe) -> None:
            for tenant, stream in zip(tenants, streams, strict=True):
                runner.queue(pipe, s.PRUNE_STREAM, [stream, lane_set], [tenant, idle_ms])

        return await runner.pipeline(self.redis, fill)

    async def record_webhook_attempt(self, job_id: str, attempt_json: str) -> bool:
        return bool(await runner.run(self.redis, s.APPEND_WEBHOOK_ATTEMPT, [keys.job_key(job_id)], [attempt_json]))


def _past_deadline(record: dict[str, str], now: float | None) -> bool:
    deadline = record.get(F.DEADLINE)
    if not deadline or record.get(F.STATE) not in (JobState.queued.value, JobState.running.value):
        return False
    return (time.time() if now is None else now) >= float(deadline)
