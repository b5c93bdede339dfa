"""The worker against a real Redis: jobs written exactly as the gateway writes them, a FakeEngine inside."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from prometheus_client import REGISTRY

from gateway.event_hub import event_hub
from jobstore import FinalWrite, JobRef, JobStore
from jobstore.connect import connect
from protocol import job_record as f
from protocol import keys
from protocol.events import DeltaEvent, StateEvent, parse_event
from protocol.jobs import JobError, JobPayload, JobResult, new_job_id
from protocol.sampling import SamplingParams
from protocol.workers import ModelCard, WorkerHeartbeat
from tests.fakes import FakeEngine, expected_text, submit_job
from worker.service import WorkerService

# Every test here runs on one redis-server and on a three-node cluster (tests/conftest.py).
pytestmark = pytest.mark.both_redis

MODEL = "fake-model"
CARD = ModelCard(name=MODEL, max_model_len=2048, tokenizer_json="", chat_template="{{ messages }}")


def payload(prompt: list[int], lane: str = "default", max_tokens: int = 256, stream: bool = False,
            **sampling) -> JobPayload:
    return JobPayload(id=new_job_id(MODEL), model=MODEL, kind="completion", lane=lane, prompt_token_ids=prompt,
                      sampling=SamplingParams(max_tokens=max_tokens, **sampling), stream=stream)


async def wait_until(pred, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await pred()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


async def final_state(r, job_id: str, timeout: float = 10.0) -> dict:
    async def done():
        h = await JobStore(r).read(job_id) or {}
        return h if h.get(f.STATE) in ("succeeded", "failed", "cancelled", "expired") else None

    return await wait_until(done, timeout)


@contextlib.asynccontextmanager
async def running(redis_url: str, engine: FakeEngine, worker_id: str = "test-host:1", grace_s: float = 5.0,
                  **kwargs):
    service = WorkerService(redis_url, MODEL, engine, CARD, worker_id=worker_id, grace_s=grace_s, block_ms=100,
                            **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        probe = connect(redis_url)
        try:  # ready once it heartbeats (groups exist by then)
            await wait_until(lambda: probe.exists(keys.worker_key(worker_id)))
        finally:
            await probe.aclose()
        yield service
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=30)
        if not done:
            for t in asyncio.all_tasks():
                t.print_stack()
            import sys
            import threading
            import traceback
            for th in threading.enumerate():
                print(th.name, "".join(traceback.format_stack(sys._current_frames()[th.ident])))
            raise AssertionError("service did not stop")
        task.result()


class Collector:
    """Subscribes to a job's channel before anything runs and keeps every event (through the gateway's
    event hub: a shard channel on a cluster)."""

    def __init__(self, r, job_id: str) -> None:
        self.hub = event_hub(r)
        self.joined = self.hub.join(keys.events_channel(job_id))
        self.events: list = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Collector:
        sub = await self.joined.__aenter__()
        self._task = asyncio.create_task(self._read(sub))
        return self

    async def _read(self, sub) -> None:
        while True:
            data = await sub.get(1.0)
            if data is not None:
                self.events.append(parse_event(data))

    async def wait_final(self, timeout: float = 10.0) -> StateEvent:
        async def final():
            return next((e for e in self.events if isinstance(e, StateEvent) and e.state.final), None)

        return await wait_until(final, timeout)

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.joined.__aexit__(None, None, None)
        await self.hub.aclose()

    @property
    def deltas(self) -> list[DeltaEvent]:
        return [e for e in self.events if isinstance(e, DeltaEvent)]


async def test_job_succeeds_with_result(redis_url, redis_client):
    r = redis_client
    p = payload([5, 6, 7, 8], max_tokens=3)
    await submit_job(r, p)
    async with running(redis_url, FakeEngine()):
        h = await final_state(r, p.id)
    assert h[f.STATE] == "succeeded"
    result = JobResult.model_validate_json(h[f.RESULT])
    assert result.text == expected_text([5, 6, 7, 8], 3) == "t5 t6 t7 "
    assert result.finish_reason == "length"
    assert result.token_ids == [5, 6, 7]
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 3
    assert result.usage.total_tokens == 7 and result.logprobs is None
    assert h[f.ATTEMPTS] == "1" and h[f.WORKER] == "test-host:1"
    assert float(h[f.STARTED_AT]) <= float(h[f.FINISHED_AT])
    assert f.TEXT not in h and int(h[f.SEQ]) == 1  # only the final event was published; the text is the result's
    ttl = await r.ttl(keys.job_key(p.id))
    assert 0 < ttl <= f.RETENTION_SECONDS
    stream = keys.jobs_stream(MODEL, "default", "default")
    assert await r.xlen(stream) == 0  # acknowledged and deleted
    assert (await r.xpending(stream, keys.GROUP))["pending"] == 0


async def test_streamed_job_publishes_ordered_deltas(redis_url, redis_client):
    r = redis_client
    prompt = list(range(100, 130))
    p = payload(prompt, stream=True)
    async with Collector(r, p.id) as c:
        await submit_job(r, p, streamed=True)
        async with running(redis_url, FakeEngine(step_sleep=0.005)):
            final = await c.wait_final()
            h = await final_state(r, p.id)
        deltas = c.deltas
    assert len(deltas) >= 2
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
    text = ""
    for d in deltas:
        assert d.offset == len(text)
        text += d.text
    assert sum(len(d.token_ids) for d in deltas) == len(prompt)
    assert final.state.value == "succeeded" and final.seq == deltas[-1].seq + 1
    assert final.result is not None and final.result.text == text == expected_text(prompt, 256)
    assert h[f.TEXT] == text and int(h[f.SEQ]) == final.seq
    assert f.FIRST_TOKEN_AT in h


async def test_scripts_forgotten_by_redis_are_loaded_again(redis_url, redis_client):
    """The worker sends its scripts by SHA1 alone (jobstore/runner.py): after Redis forgets them (a restart; here
    SCRIPT FLUSH, before the job and again while it streams), jobs still start, stream and finish."""
    r = redis_client
    prompt = list(range(100, 140))
    p = payload(prompt, stream=True)
    async with Collector(r, p.id) as c:
        async with running(redis_url, FakeEngine(step_sleep=0.01)):
            await r.script_flush()
            await submit_job(r, p, streamed=True)
            async def streaming() -> bool:
                return bool(c.deltas)

            await wait_until(streaming)
            await r.script_flush()
            final = await c.wait_final()
        deltas = c.deltas
    assert final.state.value == "succeeded" and final.result is not None
    assert final.result.text == "".join(d.text for d in deltas) == expected_text(prompt, 256)
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))


async def test_pipelines_never_ask_script_exists(redis_url, redis_client, monkeypatch):
    """redis-py's pipelines ask SCRIPT EXISTS before each execute that holds a registered Script: a round
    trip on every job start and first token. The worker's pipelines carry bare EVALSHAs (jobstore/runner.py)."""
    from redis.asyncio.client import Pipeline

    from worker.pruning import Pruner

    asked: list[int] = []
    load_scripts = Pipeline.load_scripts

    async def counting(self):
        asked.append(len(self.scripts))
        return await load_scripts(self)

    monkeypatch.setattr(Pipeline, "load_scripts", counting)
    r = redis_client
    p = payload(list(range(100, 110)), stream=True)
    async with Collector(r, p.id) as c:
        async with running(redis_url, FakeEngine(step_sleep=0.005)):
            await submit_job(r, p, streamed=True)
            final = await c.wait_final()
    await Pruner(r, MODEL).prune()  # the other pipelined script
    assert final.state.value == "succeeded" and len(c.deltas) >= 1
    assert asked == []


async def test_snapshot_matches_published_prefix(redis_url, redis_client):
    """Mid-run, the hash's text is exactly the concatenation of deltas up to its seq."""
    r = redis_client
    p = payload(list(range(1, 60)), stream=True)
    async with Collector(r, p.id) as c:
        await submit_job(r, p, streamed=True)
        async with running(redis_url, FakeEngine(step_sleep=0.01)):
            snaps = []
            for _ in range(10):
                snaps.append(await r.hmget(keys.job_key(p.id), [f.TEXT, f.SEQ]))
                await asyncio.sleep(0.03)
            await c.wait_final()
        by_seq = {d.seq: d for d in c.deltas}
    for text, seq in snaps:
        if text is None or seq in (None, "0"):
            continue
        assert "".join(by_seq[s].text for s in range(1, int(seq) + 1)) == text


async def test_unstreamed_job_publishes_no_deltas(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(10, 30)))
    async with Collector(r, p.id) as c:
        await submit_job(r, p)
        async with running(redis_url, FakeEngine()):
            final = await c.wait_final()
        await asyncio.sleep(0.05)
        assert c.deltas == []
        assert len(c.events) == 1 and final.seq == 1
    assert final.result is not None and final.result.text == expected_text(list(range(10, 30)), 256)


async def test_streamed_flag_set_mid_run_starts_deltas(redis_url, redis_client):
    r = redis_client
    prompt = list(range(1, 81))
    p = payload(prompt)
    async with Collector(r, p.id) as c:
        await submit_job(r, p)
        async with running(redis_url, FakeEngine(step_sleep=0.02)):
            await asyncio.sleep(0.4)
            assert c.deltas == []
            await r.hset(keys.job_key(p.id), f.STREAMED, "1")
            final = await c.wait_final()
        deltas = c.deltas
    assert len(deltas) >= 2
    assert deltas[0].offset == 0 and len(deltas[0].token_ids) > 1  # catch-up: everything so far at once
    assert "".join(d.text for d in deltas) == final.result.text == expected_text(prompt, 256)
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))


async def test_interactive_lane_runs_first(redis_url, redis_client):
    r = redis_client
    batch = [payload([1, 2, 3], lane="batch") for _ in range(3)]
    inter = [payload([4, 5, 6], lane="interactive") for _ in range(3)]
    for p in batch + inter:  # batch queued first
        await submit_job(r, p)
    engine = FakeEngine(capacity=1)
    async with running(redis_url, engine):
        for p in batch + inter:
            await final_state(r, p.id)
    order = [rid for rid, _ in engine.added]
    assert order == [p.id for p in inter] + [p.id for p in batch]
    assert [prio for _, prio in engine.added] == [0, 0, 0, 2, 2, 2]


# Pending entries, the group's lag and the stream's length, read at one instant (a cluster has no MULTI).
_QUEUE_VIEW = """
local lag = false
local group = redis.call('XINFO', 'GROUPS', KEYS[1])[1]
for i = 1, #group, 2 do if group[i] == 'lag' then lag = group[i + 1] end end
return {redis.call('XPENDING', KEYS[1], ARGV[1])[1], lag, redis.call('XLEN', KEYS[1])}
"""


async def test_intake_reads_no_more_than_admissible(redis_url, redis_client):
    r = redis_client
    capacity = 2
    jobs = [payload(list(range(1, 16))) for _ in range(8)]
    for p in jobs:
        await submit_job(r, p)
    stream = keys.jobs_stream(MODEL, "default", "default")
    async with running(redis_url, FakeEngine(capacity=capacity, step_sleep=0.01)):
        seen_max = 0
        for _ in range(40):
            pending, lag, xlen = await r.eval(_QUEUE_VIEW, 1, stream, keys.GROUP)  # one consistent view
            seen_max = max(seen_max, pending)
            assert pending <= capacity
            if lag is not None:  # the rest stays in the stream, undelivered
                assert lag + pending == xlen
            await asyncio.sleep(0.02)
        for p in jobs:
            assert (await final_state(r, p.id))[f.STATE] == "succeeded"
    assert seen_max >= 1
    assert await r.xlen(stream) == 0


async def test_first_final_write_wins(redis_client):
    r = redis_client
    p = payload([1, 2])
    await submit_job(r, p)
    store, ref = JobStore(r), JobRef.of(p)
    key = keys.job_key(p.id)
    ok = JobResult(text="a", finish_reason="stop",
                   usage={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}).model_dump_json()
    assert await store.write([], [FinalWrite(ref, "succeeded", ok, "", 1.0)]) == [1]
    before = await r.hgetall(key)
    err = json.dumps({"type": "engine_error", "message": "late"})
    assert await store.write([], [FinalWrite(ref, "failed", "", err, 2.0)]) == [0]
    assert await r.hgetall(key) == before
    assert before[f.STATE] == "succeeded" and before[f.SEQ] == "1"
    assert f.ERROR not in before
    assert await r.get(keys.tenant_queued_key(p.tenant, MODEL)) == "0"  # counted down once
    assert await r.hgetall(keys.lane_depth_key(MODEL, p.lane)) == {}


async def test_heartbeat_and_model_card(redis_url, redis_client):
    r = redis_client
    async with running(redis_url, FakeEngine(capacity=3), worker_id="hb-host:42"):
        raw = await wait_until(lambda: r.get(keys.worker_key("hb-host:42")))
        hb = WorkerHeartbeat.model_validate_json(raw)
        assert hb.model == MODEL and hb.capacity == 3 and hb.max_model_len == CARD.max_model_len
        assert 0 < await r.ttl(keys.worker_key("hb-host:42")) <= 10
        assert await r.sismember(keys.WORKERS_SET, "hb-host:42")
        card_hash = await r.hgetall(keys.model_card_key(MODEL))
        assert sorted(card_hash) == ["card", "digest"]
        assert ModelCard.model_validate_json(card_hash["card"]) == CARD
        assert card_hash["digest"] == CARD.digest()
    assert await r.get(keys.worker_key("hb-host:42")) is None
    assert not await r.sismember(keys.WORKERS_SET, "hb-host:42")


async def test_stop_hands_unfinished_entries_back(redis_url, redis_client):
    """Drain: what did not finish in the grace stays pending, unacknowledged, but claimable at once (idle
    past any lease, the given-back delivery not counted), and its job is queued again."""
    r = redis_client
    jobs = [payload(list(range(1, 200))) for _ in range(2)]
    for p in jobs:
        await submit_job(r, p)
    stream = keys.jobs_stream(MODEL, "default", "default")
    async with running(redis_url, FakeEngine(step_sleep=0.02), grace_s=0.2):
        await wait_until(lambda: _all_running(r, jobs))
    assert (await r.xpending(stream, keys.GROUP))["pending"] == 2
    for entry in await r.xpending_range(stream, keys.GROUP, "-", "+", 10):
        assert entry["time_since_delivered"] > 3600_000 and entry["times_delivered"] == 0
    for p in jobs:
        h = await r.hgetall(keys.job_key(p.id))
        assert h[f.STATE] == "queued" and f.RESULT not in h and h[f.ATTEMPTS] == "1"


async def _all_running(r, jobs) -> bool:
    states = [await r.hget(keys.job_key(p.id), f.STATE) for p in jobs]
    return all(s == "running" for s in states)


async def test_running_jobs_finish_within_grace(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(1, 30)))
    await submit_job(r, p)
    async with running(redis_url, FakeEngine(step_sleep=0.01), grace_s=10):
        await wait_until(lambda: _all_running(r, [p]))
    assert (await r.hget(keys.job_key(p.id), f.STATE)) == "succeeded"


async def test_malformed_entry_fails_job_and_intake_goes_on(redis_url, redis_client):
    r = redis_client
    bad_id = new_job_id(MODEL)
    await r.hset(keys.job_key(bad_id), mapping={f.STATE: "queued", f.SEQ: 0, f.ATTEMPTS: 0})
    stream = keys.jobs_stream(MODEL, "default", "default")
    await r.xadd(stream, {"job_id": bad_id, "payload": "{not json"})
    await r.xadd(stream, {"garbage": "1"})
    too_long = payload(list(range(1, 40)))
    await submit_job(r, too_long)
    good = payload([1, 2, 3])
    await submit_job(r, good)
    async with running(redis_url, FakeEngine(max_model_len=32)):
        assert (await final_state(r, good.id))[f.STATE] == "succeeded"
        h = await final_state(r, bad_id)
        h2 = await final_state(r, too_long.id)
    assert h[f.STATE] == "failed" and json.loads(h[f.ERROR])["type"] == "invalid_request"
    error = json.loads(h2[f.ERROR])  # the request's fault, as the gateway answers a prompt over the context
    assert h2[f.STATE] == "failed" and error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded" and "maximum context length is 32 tokens" in error["message"]
    assert await r.xlen(stream) == 0
    assert (await r.xpending(stream, keys.GROUP))["pending"] == 0


async def test_already_final_job_is_dropped(redis_url, redis_client):
    r = redis_client
    p = payload([1, 2, 3])
    await submit_job(r, p)
    await r.hset(keys.job_key(p.id), f.STATE, "cancelled")
    engine = FakeEngine()
    stream = keys.jobs_stream(MODEL, "default", "default")
    async with running(redis_url, engine):
        await wait_until(lambda: _xlen_is(r, stream, 0))
        await asyncio.sleep(0.1)  # a few fake steps: whatever the engine made of it must stay unpublished
    # The engine may have started it (new entries go to it before the start script answers), but it was
    # aborted, and nothing of it was written.
    assert not engine.requests
    h = await r.hgetall(keys.job_key(p.id))
    assert h[f.STATE] == "cancelled" and h[f.ATTEMPTS] == "0"
    assert f.TEXT not in h and f.RESULT not in h and f.FIRST_TOKEN_AT not in h


async def _xlen_is(r, stream, n) -> bool:
    return await r.xlen(stream) == n


async def test_cancel_mid_run_aborts_in_engine(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(1, 300)))
    await submit_job(r, p)
    engine = FakeEngine(step_sleep=0.01)
    stream = keys.jobs_stream(MODEL, "default", "default")
    async with running(redis_url, engine):
        await wait_until(lambda: _all_running(r, [p]))
        await r.hset(keys.job_key(p.id), f.STATE, "cancelled")
        await wait_until(lambda: _xlen_is(r, stream, 0))
        await wait_until(lambda: _engine_empty(engine))
    h = await r.hgetall(keys.job_key(p.id))
    assert h[f.STATE] == "cancelled" and f.RESULT not in h


async def _engine_empty(engine) -> bool:
    return not engine.requests


async def test_engine_step_error_fails_running_jobs(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(1, 50)))
    await submit_job(r, p)
    engine = FakeEngine(step_sleep=0.01, fail_at_step=3)
    async with running(redis_url, engine):
        h = await final_state(r, p.id)
        assert h[f.STATE] == "failed"
        assert "fake step failure" in json.loads(h[f.ERROR])["message"]
        later = payload([7, 8])  # the worker keeps serving after a failed step
        await submit_job(r, later)
        assert (await final_state(r, later.id))[f.STATE] == "succeeded"


async def test_logprobs_and_cached_tokens(redis_url, redis_client):
    r = redis_client
    p = payload([3, 4], logprobs=2)
    await submit_job(r, p)
    async with running(redis_url, FakeEngine(cached_tokens=1)):
        h = await final_state(r, p.id)
    result = JobResult.model_validate_json(h[f.RESULT])
    assert result.usage.cached_tokens == 1
    assert result.logprobs is not None and [lp.token_id for lp in result.logprobs] == [3, 4]
    assert result.logprobs[0].logprob == pytest.approx(-0.5) and result.logprobs[0].top[1][0] == 4


async def test_echo_prompt_leads_the_text(redis_url, redis_client):
    r = redis_client
    p = payload([3, 4]).model_copy(update={"echo_prompt": "hello "})
    await submit_job(r, p)
    async with running(redis_url, FakeEngine()):
        h = await final_state(r, p.id)
    assert JobResult.model_validate_json(h[f.RESULT]).text == "hello t3 t4 "


async def test_cancel_requested_ends_job_cancelled_with_partial_result(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(1, 300)), stream=True)
    engine = FakeEngine(step_sleep=0.01)
    counted = ("tokenq_worker_requests_finished_total", {"model": MODEL, "reason": "cancelled"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    async with Collector(r, p.id) as c:
        await submit_job(r, p, streamed=True)
        async with running(redis_url, engine):
            await wait_until(lambda: _all_running(r, [p]))
            await asyncio.sleep(0.1)
            await r.hset(keys.job_key(p.id), f.CANCEL_REQUESTED, "1")
            final = await c.wait_final()
            h = await final_state(r, p.id)
            await wait_until(lambda: _engine_empty(engine))
        deltas = c.deltas
    assert final.state.value == "cancelled" and h[f.STATE] == "cancelled"
    assert REGISTRY.get_sample_value(*counted) == before + 1  # counted as it ended, not as the engine's "abort"
    result = JobResult.model_validate_json(h[f.RESULT])
    assert result.finish_reason == "abort" and 0 < len(result.token_ids) < 299
    assert "".join(d.text for d in deltas) == result.text == h[f.TEXT]
    assert final.seq == int(h[f.SEQ]) == deltas[-1].seq + 1
    assert await r.xlen(keys.jobs_stream(MODEL, "default", "default")) == 0


async def test_deadlines_expire_queued_and_running_jobs(redis_url, redis_client):
    r = redis_client
    late = payload([1, 2, 3]).model_copy(update={"deadline": time.time() - 1})
    soon = payload(list(range(1, 300))).model_copy(update={"deadline": time.time() + 0.5})
    await submit_job(r, late)
    await submit_job(r, soon)
    engine = FakeEngine(step_sleep=0.01)
    async with running(redis_url, engine):
        h_late = await final_state(r, late.id)
        h_soon = await final_state(r, soon.id)
    assert [rid for rid, _ in engine.added] == [soon.id]
    for h in (h_late, h_soon):
        assert h[f.STATE] == "expired" and json.loads(h[f.ERROR])["type"] == "deadline_exceeded"
    assert await r.xlen(keys.jobs_stream(MODEL, "default", "default")) == 0


async def test_running_job_past_its_deadline_ends_expired_with_its_partial_text(redis_url, redis_client):
    r = redis_client
    p = payload(list(range(100, 400)), max_tokens=300).model_copy(update={"deadline": time.time() + 1.0})
    await submit_job(r, p)
    async with running(redis_url, FakeEngine(step_sleep=0.02)):
        h = await final_state(r, p.id, timeout=20)
    assert h[f.STATE] == "expired"
    assert JobError.model_validate_json(h[f.ERROR]).type == "deadline_exceeded"
    result = JobResult.model_validate_json(h[f.RESULT])
    assert result.finish_reason == "abort" and 0 < len(result.token_ids) < 300
    assert result.text == expected_text(list(range(100, 100 + len(result.token_ids))), 300)
    assert await r.get(keys.tenant_queued_key(p.tenant, MODEL)) == "0"


async def test_token_counters_move_while_a_job_runs(redis_url, redis_client):
    """Throughput is rate() of these counters (docs/metrics.md, `tokenq status`): a long job moves them as it
    generates, and its end adds only what is left, so the total is its usage."""
    from prometheus_client import REGISTRY

    def generated() -> float:
        return REGISTRY.get_sample_value("tokenq_worker_generation_tokens_total", {"model": MODEL}) or 0.0

    def prompted() -> float:
        return REGISTRY.get_sample_value("tokenq_worker_prompt_tokens_total", {"model": MODEL}) or 0.0

    r = redis_client
    p = payload(list(range(5, 205)), max_tokens=150)
    gen_before, prompt_before = generated(), prompted()
    await submit_job(r, p)
    async with running(redis_url, FakeEngine(step_sleep=0.01)):
        async def midway() -> bool:
            return 20 <= generated() - gen_before and (await r.hget(keys.job_key(p.id), f.STATE)) == "running"
        await wait_until(midway)
        assert prompted() - prompt_before == 200  # counted with its first token, not at its end
        h = await final_state(r, p.id)
    assert h[f.STATE] == "succeeded"
    assert generated() - gen_before == 150 and prompted() - prompt_before == 200


async def test_the_kv_cache_size_is_a_metric_from_the_start(redis_url, redis_client):
    """A size fixed when the engine is built: dashboards show it before any job (the engine's stats come with
    its first step)."""
    from prometheus_client import REGISTRY

    class Sized(FakeEngine):
        def stats(self) -> dict:
            return {**super().stats(), "num_blocks": 777}

    async with running(redis_url, Sized()):
        assert REGISTRY.get_sample_value("tokenq_worker_kv_cache_blocks", {"model": MODEL}) == 777
