"""Turns engine outputs into Redis writes: deltas for jobs someone streams, one final write per job.

Per batch (one engine step, or several if the network fell behind) the publisher sends one MULTI through
the job store: the new text of every streamed job (appended, with its DeltaEvent published), and the final
write of every job that finished; then `XACK` + `XDEL` for those. Every ~200 ms it re-reads the `streamed`
flag and the state of running jobs in one pipeline: a reader may start streaming a running job, and
the gateway may cancel one (`cancel_requested`), and a job may pass its deadline: the worker then aborts
it in the engine and writes `cancelled` (with the partial result) or `expired`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from jobstore import DeltaWrite, FinalWrite, JobRef, JobStore
from jobstore.runner import ScriptClient
from jobstore.store import CANCELLED
from protocol import choice_text, keys
from protocol import job_record as f
from protocol.events import DeltaEvent
from protocol.jobs import FINAL_STATES, Choice, JobError, JobPayload, JobResult, JobState, TokenLogprob, Usage
from protocol.outage import Outage, is_redis_oom, waits_out
from respcache import store as respcache_store
from tokenq.logs import get_logger
from worker import metrics
from worker.engine.outputs import RequestOutput, TokenLogprobs
from worker.engine_loop import EngineHandle, FailedOutput
from worker.token_text import TokenText

log = get_logger("publisher")

REFRESH_INTERVAL_S = 0.2
_FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
_FINISH_REASONS = frozenset({"stop", "length", "abort", "error"})



@dataclass(eq=False)
class ChoiceOutput:
    """One choice of a running job: its output so far and what of it is not published yet."""

    index: int
    text: str = ""  # everything so far (the echoed prompt first, when asked)
    published_len: int = 0  # characters of `text` already in the hash and on the channel
    unpublished_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    unpublished_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Finished (stop or length) while the job's other choices go on, and not yet said on a delta
    end_unpublished: bool = False


@dataclass(eq=False)
class RunningJob:
    """What the worker keeps about a job between its start and its final write."""

    payload: JobPayload
    stream: str
    entry_id: str
    streamed: bool
    seq: int  # the hash's `seq`: last published event
    started_at: float
    choices: list[ChoiceOutput] = field(default_factory=list)  # n of them, by index
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    first_token_at: float | None = None
    first_token_written: bool = False
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None  # the job's: its last output's ("error" fails it)
    error: str = ""
    error_type: str = "engine_error"
    stop_state: str | None = None  # "cancelled" or "expired" when the worker stopped it early
    counted: tuple[int, int, int] = (0, 0, 0)  # prompt, cached and output tokens already in the counters

    def __post_init__(self) -> None:
        echo = self.payload.echo_prompt or ""
        self.choices = [ChoiceOutput(i, text=echo) for i in range(self.payload.sampling.n)]

    @property
    def id(self) -> str:
        return self.payload.id

    @property
    def lane(self) -> str:
        return self.payload.lane

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens or len(c.token_ids) for c in self.choices)

    def absorb(self, out: RequestOutput, now: float) -> None:
        choice = self.choices[out.index]
        if out.new_token_ids:
            if self.first_token_at is None:
                self.first_token_at = out.produced_at or now  # the engine's clock, when it has one
            choice.token_ids.extend(out.new_token_ids)
            choice.unpublished_ids.extend(out.new_token_ids)
        choice.text += out.text_delta
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            if self.payload.echo_prompt is not None:  # the echoed text's entries come first, in every choice
                for c in self.choices:
                    c.unpublished_logprobs[:0] = out.prompt_logprobs
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
            choice.unpublished_logprobs.extend(out.logprobs)
        # Counts are cumulative in the engine; an error output may carry zeros, so keep the largest seen.
        self.num_prompt_tokens = max(self.num_prompt_tokens, out.num_prompt_tokens)
        choice.num_output_tokens = max(choice.num_output_tokens, out.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            reason = out.finish_reason or "stop"
            choice.finish_reason = reason if reason in _FINISH_REASONS else "stop"
            choice.stop_reason = out.stop_reason
            if out.request_finished:
                self.finish_reason = choice.finish_reason
            elif out.finish_reason in ("stop", "length") and not isinstance(out, FailedOutput):
                choice.end_unpublished = True
            if isinstance(out, FailedOutput):
                self.finish_reason, self.error, self.error_type = "error", out.error, out.error_type

    def take_deltas(self, token_text: TokenText | None = None) -> list[DeltaEvent]:
        """The next deltas to publish (everything not yet published), one per choice with new text."""
        events = []
        for choice in self.choices:
            ends = choice.end_unpublished
            if len(choice.text) <= choice.published_len and not ends:
                continue
            self.seq += 1
            logprobs = None
            if self.payload.sampling.logprobs is not None:
                logprobs = to_protocol_logprobs(choice.unpublished_logprobs, token_text,
                                                self.payload.prompt_token_ids[0])
                choice.unpublished_logprobs = []
            events.append(DeltaEvent(seq=self.seq, offset=choice.published_len, index=choice.index,
                                     text=choice.text[choice.published_len:], token_ids=choice.unpublished_ids,
                                     logprobs=logprobs, finish_reason=choice.finish_reason if ends else None,
                                     stop_reason=choice.stop_reason if ends else None))
            choice.published_len = len(choice.text)
            choice.unpublished_ids = []
            choice.end_unpublished = False
        return events


def to_protocol_logprobs(items: list[TokenLogprobs | None], token_text: TokenText | None,
                         first_prompt_id: int = 0) -> list[TokenLogprob]:
    """Protocol entries with token text; None (the prompt's first token, which nothing predicts) becomes
    that token with logprob None."""
    text = token_text or (lambda _id: "")
    return [
        TokenLogprob(token_id=first_prompt_id, token=text(first_prompt_id), logprob=None) if lp is None
        else TokenLogprob(token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
                          top=[(tid, text(tid), v) for tid, v in lp.top])
        for lp in items
    ]


def build_result(job: RunningJob, token_text: TokenText | None = None) -> JobResult:
    """The job's result: its first choice's fields, every choice when it has several; usage counts them all."""
    prompt = job.num_prompt_tokens or len(job.payload.prompt_token_ids)
    completion = job.num_output_tokens
    prompt_logprobs = None
    if job.prompt_logprobs is not None:
        prompt_logprobs = to_protocol_logprobs(job.prompt_logprobs, token_text, job.payload.prompt_token_ids[0])
    want_logprobs = job.payload.sampling.logprobs is not None
    # A choice the job's end cut short (cancelled, expired) ends as the job did.
    choices = [Choice(index=c.index, text=c.text, finish_reason=c.finish_reason or job.finish_reason or "stop",
                      stop_reason=c.stop_reason, token_ids=c.token_ids,
                      logprobs=to_protocol_logprobs(c.logprobs, token_text) if want_logprobs else None)
               for c in job.choices]
    first = choices[0]
    return JobResult(
        text=first.text,
        finish_reason=first.finish_reason,
        stop_reason=first.stop_reason,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                    cached_tokens=job.num_cached_tokens),
        token_ids=first.token_ids,
        logprobs=first.logprobs,
        prompt_logprobs=prompt_logprobs,
        choices=choices if len(choices) > 1 else None,
    ).with_tool_calls(job.payload.tools)


def final_write(job: RunningJob, now: float, token_text: TokenText | None = None) -> FinalWrite:
    """The final write of a finished job: failed with a JobError on "error"; cancelled with the partial
    result; expired past the deadline with the partial result and a JobError; else succeeded."""
    first = repr(job.first_token_at) if job.first_token_at else ""
    ref = JobRef.of(job.payload)
    if job.stop_state == JobState.expired.value:
        err = JobError(type="deadline_exceeded", message="the job ran past its deadline")
        return FinalWrite(ref, JobState.expired.value, build_result(job, token_text).model_dump_json(),
                          err.model_dump_json(), now, first)
    if job.stop_state == JobState.cancelled.value:  # the error a queued job cancelled gets too
        return FinalWrite(ref, JobState.cancelled.value, build_result(job, token_text).model_dump_json(),
                          CANCELLED.model_dump_json(), now, first)
    if job.finish_reason == "error":
        err = JobError(type=job.error_type, message=job.error or "the engine failed to run this job")
        return FinalWrite(ref, JobState.failed.value, "", err.model_dump_json(), now, first)
    return FinalWrite(ref, JobState.succeeded.value, build_result(job, token_text).model_dump_json(), "", now,
                      first)


class Publisher:
    def __init__(self, redis: Redis, engine_loop: EngineHandle, model: str,
                 token_text: TokenText | None = None, refresh_interval: float = REFRESH_INTERVAL_S,
                 scripts: ScriptClient | None = None) -> None:
        """`scripts`: the connection a step's deltas go out on (jobstore/pipe.py); default `redis`."""
        self.redis = redis
        self.store = JobStore(redis, scripts)
        self.engine_loop = engine_loop
        self.model = model
        self._prompt_tokens = metrics.PROMPT_TOKENS.labels(model)
        self._cached_tokens = metrics.CACHED_PROMPT_TOKENS.labels(model)
        self._generation_tokens = metrics.GENERATION_TOKENS.labels(model)
        self.token_text = token_text
        self.refresh_interval = refresh_interval
        self.jobs: dict[str, RunningJob] = {}
        # Finished in the engine, final write or XACK still in flight: their leases are kept alive too,
        # and a drain waits for them.
        self.finishing: dict[str, RunningJob] = {}
        # Jobs the engine runs while their start script is in flight: outputs wait here until `track`.
        self._starting: dict[str, list[RequestOutput]] = {}
        self._replay: list[RequestOutput] = []  # held outputs of jobs tracked since, published first
        self._last_refresh = 0.0
        self.stopped = False  # set before cancelling the task: a second way out of the loop
        self.on_expect: Callable[[], None] | None = None  # a job went to the engine (protocol/hot_loop.py)

    def has(self, job_id: str) -> bool:
        return job_id in self.jobs or job_id in self.finishing or job_id in self._starting

    def expect(self, job_id: str) -> None:
        """The engine runs this job already; hold its outputs until `track` (or drop them: `unexpect`)."""
        self._starting[job_id] = []
        if self.on_expect is not None:
            self.on_expect()

    def reports_due(self) -> bool:
        """A job runs (or finishes) here, or is starting: the engine's reports are due."""
        return self.busy or bool(self._starting)

    def unexpect(self, job_id: str) -> None:
        self._starting.pop(job_id, None)

    def track(self, job: RunningJob) -> None:
        self.jobs[job.id] = job
        held = self._starting.pop(job.id, None)
        if held:
            self._replay.extend(held)
            queue = self.engine_loop.outputs
            if queue is not None:
                queue.put_nowait([])  # wake the loop: these may be the job's last outputs

    def forget(self, job_id: str) -> bool:
        """Stop a job here without writing anything (another worker owns it now); False if not running."""
        if self.jobs.pop(job_id, None) is None:
            return False
        self.engine_loop.abort(job_id)
        return True

    @property
    def busy(self) -> bool:
        return bool(self.jobs or self.finishing)

    def __len__(self) -> int:
        return len(self.jobs)

    async def run(self) -> None:
        """Consume output batches until cancelled. Batches that arrive while a write is in flight are merged
        into the next one: the slower Redis is, the fewer and larger the writes."""
        queue = self.engine_loop.outputs
        assert queue is not None, "start the engine first"
        while not self.stopped:
            batch: list[RequestOutput] = []
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(self.refresh_interval):
                    batch = await queue.get()
            except TimeoutError:
                pass
            while not queue.empty():  # fell behind: merge, one round trip for all
                batch.extend(queue.get_nowait())
            try:
                if batch or self._replay:
                    await self.publish(batch)
                if self.jobs and time.monotonic() - self._last_refresh >= self.refresh_interval:
                    await self.refresh()
            except Exception as e:  # one bad batch must not stop the worker's results from flowing
                log.exception("publishing failed", error=repr(e))

    async def _retrying(self, fn, *args):
        """fn's result, retried with backoff while Redis is unreachable (a restart, a network blip) or full
        (maxmemory reached: writes refused until memory is freed), so that a job that ran meanwhile still
        gets its deltas and its final write; None once stopped (entries stay pending)."""
        outage = Outage(log, "publisher", cap_s=2.0)
        while True:
            try:
                result = await fn(*args)
                outage.restored()
                return result
            except Exception as e:
                # NoScriptError: Redis forgot the scripts again between the store's load and its second
                # send; a new attempt loads them again.
                if not (isinstance(e, NoScriptError) or waits_out(e)):
                    raise
                if self.stopped:
                    log.error("redis unavailable and stopping: giving up on this write (entries stay pending)")
                    return None
                await asyncio.sleep(outage.lost(e))

    async def publish(self, outputs: list[RequestOutput]) -> None:
        if self._replay:
            outputs, self._replay = self._replay + outputs, []
        now = time.time()
        touched: dict[str, RunningJob] = {}
        finishing: list[RunningJob] = []
        firsts: list[tuple[str, float]] = []  # (lane, time to first token) of the jobs whose first token this is
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:  # aborted (cancelled) or dropped on shutdown, or its start not confirmed yet
                if (held := self._starting.get(out.request_id)) is not None:
                    held.append(out)
                continue
            first = job.first_token_at is None
            job.absorb(out, now)
            if first and job.first_token_at is not None:
                firsts.append((job.lane, max(0.0, job.first_token_at - job.payload.enqueued_at)))
            touched[job.id] = job
            if out.request_finished:
                finishing.append(job)
                del self.jobs[job.id]
        try:
            await self._flush(list(touched.values()), finishing, now)
        finally:  # observed once the writes are out: a first token's way to its reader waits for no metric
            for lane, ttft in firsts:
                metrics.TIME_TO_FIRST_TOKEN.labels(self.model, lane).observe(ttft)
            self._count_tokens(touched.values())

    async def _flush(self, touched: list[RunningJob], finishing: list[RunningJob], now: float) -> None:
        """Write out; `finishing` stays in `self.finishing` only if we stopped (or were cancelled) before
        its writes were done, so that the drain hands those entries back."""
        for job in finishing:
            self.finishing[job.id] = job
        settled = False
        try:
            settled = await self._write_out(touched, finishing, now)
        except Exception:
            settled = True  # not retryable: leave the entries pending for a rerun after the lease
            raise
        finally:
            if settled:
                for job in finishing:
                    self.finishing.pop(job.id, None)

    async def _write_out(self, touched: list[RunningJob], finishing: list[RunningJob], now: float) -> bool:
        """Deltas of the streamed jobs among `touched`, final writes of `finishing`, then XACK + XDEL.
        False when Redis stayed away until we stopped."""
        # Plan the writes once, so that a retried write re-sends the same deltas and final states (the store
        # skips a delta whose seq the job has already).
        deltas: list[DeltaWrite] = []
        for job in touched:
            if not job.streamed:
                continue
            n = len(job.choices)
            for delta in job.take_deltas(self.token_text):
                first = ""
                if job.first_token_at is not None and not job.first_token_written:
                    first = repr(job.first_token_at)
                    job.first_token_written = True
                deltas.append(DeltaWrite(job.id, choice_text.stored(delta.index, delta.text, n), delta.seq,
                                         delta.model_dump_json(), first, job.num_output_tokens))
        finals = [(job, final_write(job, now, self.token_text)) for job in finishing]
        if not deltas and not finals:
            return True
        results = await self._retrying(self.store.write, deltas, [fw for _, fw in finals])
        if results is None:
            return False
        if not finals:
            return True

        acks: list[RunningJob] = []
        fills: list[tuple[str, str]] = []
        for (job, fw), written in zip(finals, results, strict=True):
            jlog = log.bind(job_id=job.id)
            if is_redis_oom(written):  # refused by a full Redis: written alone once it takes writes again
                written = await self._retrying(self._write_final, fw)
                if written is None:  # stopping: the entry stays pending
                    continue
            if isinstance(written, Exception):
                # Leave the entry pending: another worker reruns it after the lease.
                jlog.error("final write failed", error=repr(written))
                continue
            if written == -1:
                jlog.info("job record is gone; result dropped")
            elif written == 0:
                metrics.DUPLICATE_FINALS.labels(self.model).inc()
                jlog.info("job was already final; result dropped")
            else:
                self._observe_finished(job, now)
                jlog.info("job finished", finish_reason=job.finish_reason, tokens=job.num_output_tokens)
                if job.payload.cache_fill and fw.state == JobState.succeeded.value:
                    fills.append((job.id, fw.result_json))
            acks.append(job)
        if fills:
            await self._fill_cache(fills)
        return not acks or await self._retrying(self._ack, acks) is not None

    async def _write_final(self, fw: FinalWrite) -> int | Exception:
        """One final write's answer (or its error); a full Redis's refusal raised, for `_retrying` to wait out."""
        [written] = await self.store.write([], [fw])
        if is_redis_oom(written):
            raise written
        return written

    async def _fill_cache(self, fills: list[tuple[str, str]]) -> None:
        """Succeeded jobs that missed the response cache become its entries; a failure here costs only a
        later hit, never the job."""
        for job_id, result_json in fills:
            try:
                await respcache_store.fill(self.redis, job_id, result_json)
            except Exception as e:  # noqa: BLE001
                log.warning("response cache fill failed", job_id=job_id, error=repr(e))

    async def _ack(self, jobs: list[RunningJob]) -> bool:
        await self.store.ack((job.stream, job.entry_id) for job in jobs)
        return True

    def _observe_finished(self, job: RunningJob, now: float) -> None:
        m = self.model
        # A job the worker stopped counts as it ended (cancelled, expired), not as the engine's "abort".
        metrics.REQUESTS_FINISHED.labels(m, job.stop_state or job.finish_reason or "stop").inc()
        n_prompt = job.num_prompt_tokens or len(job.payload.prompt_token_ids)
        self._count_tokens([job], prompt_floor=n_prompt)
        n_out = job.num_output_tokens
        metrics.observe_finished(m, job.lane, job.payload.enqueued_at, n_prompt, n_out, now)
        if job.first_token_at is not None and n_out > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(m, job.lane).observe((now - job.first_token_at) / (n_out - 1))

    def _count_tokens(self, jobs: Iterable[RunningJob], prompt_floor: int = 0) -> None:
        """The token counters move as the engine reports jobs' tokens, as vLLM's move each step (one increment
        of each counter for a step's jobs): a rate() over a long job reads its throughput, not nothing and then
        a spike when it ends. `prompt_floor`: a finished job's prompt, counted whole even if never prefilled."""
        prompt = cached = out = 0
        for job in jobs:
            was_prompt, was_cached, was_out = job.counted
            now = (max(job.num_prompt_tokens, prompt_floor, was_prompt), max(job.num_cached_tokens, was_cached),
                   max(job.num_output_tokens, was_out))
            prompt, cached, out = prompt + now[0] - was_prompt, cached + now[1] - was_cached, out + now[2] - was_out
            job.counted = now
        for counter, n in ((self._prompt_tokens, prompt), (self._cached_tokens, cached),
                           (self._generation_tokens, out)):
            if n:
                counter.inc(n)

    async def refresh(self) -> None:
        """Re-read `streamed`, `state` and `cancel_requested` of running jobs (one pipelined HMGET each);
        stop jobs that are cancelled, final elsewhere, or past their deadline."""
        self._last_refresh = time.monotonic()
        jobs = list(self.jobs.values())
        if not jobs:
            return
        rows = await self._retrying(self._read_flags, jobs)
        if rows is None:
            return
        now = time.time()
        dropped: list[RunningJob] = []
        stopped: list[RunningJob] = []
        for job, (streamed, state, cancel) in zip(jobs, rows, strict=True):
            if job.id not in self.jobs:
                continue
            if state is None or state in _FINAL_VALUES:
                # Final elsewhere (another worker, an expiry): stop spending the GPU on it, write nothing.
                log.info("job final elsewhere; aborting it", job_id=job.id, state=state)
                dropped.append(job)
            elif cancel == "1":
                log.info("job cancelled; aborting it", job_id=job.id)
                job.stop_state = JobState.cancelled.value
                stopped.append(job)
            elif job.payload.deadline is not None and now >= job.payload.deadline:
                log.info("job past its deadline; aborting it", job_id=job.id)
                job.stop_state = JobState.expired.value
                stopped.append(job)
            elif streamed == "1" and not job.streamed:
                log.debug("job is now streamed", job_id=job.id)
                job.streamed = True  # the next batch publishes everything so far as one delta
        for job in dropped + stopped:
            self.engine_loop.abort(job.id)
            del self.jobs[job.id]
        for job in stopped:
            job.finish_reason = "abort"
        if stopped:
            await self._flush(stopped, stopped, now)
        if dropped:
            await self._retrying(self._ack, dropped)

    async def _read_flags(self, jobs: list[RunningJob]) -> list:
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.hmget(keys.job_key(job.id), [f.STREAMED, f.STATE, f.CANCEL_REQUESTED])
        return await pipe.execute()

    async def end_untracked(self, job_id: str, stream: str, entry_id: str, error: JobError,
                            state: str = JobState.failed.value, tenant: str | None = None,
                            lane: str = "default") -> int:
        """End a job that never reached the engine (bad payload, too long: failed; past its deadline:
        expired), then drop its entry. Returns 1 if this was the job's final write."""
        if tenant is None:
            tenant, lane = await self.redis.hmget(keys.job_key(job_id), [f.TENANT, f.LANE])
        final = FinalWrite(JobRef(job_id, tenant or "default", self.model, lane or "default"), state, "",
                           error.model_dump_json(), time.time())
        written = await self.store.finish_entry(final, stream, entry_id)
        if written == 1:
            metrics.REQUESTS_FINISHED.labels(self.model, "error" if state == "failed" else state).inc()
        elif written == 0:
            metrics.DUPLICATE_FINALS.labels(self.model).inc()
        return written  # -1: the job record is gone; its entry is dropped all the same
