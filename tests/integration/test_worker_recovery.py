"""Leases against a real Redis: reclaiming a dead worker's entries, keeping our own, the delivery limit,
duplicate final writes, and the drain's hand-back to another worker."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import REGISTRY

from jobstore import JobStore
from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobResult
from tests.fakes import FakeEngine, expected_text, submit_job
from tests.integration.test_worker_service import MODEL, final_state, payload, running, wait_until

# Every test here runs on one redis-server and on a three-node cluster (tests/conftest.py).
pytestmark = pytest.mark.both_redis

STREAM = keys.jobs_stream(MODEL, "default", "default")


DEAD = "dead-host:1"


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": MODEL}) or 0.0


async def read_as_dead_worker(r, n: int) -> list[str]:
    """Deliver n entries to a consumer that then 'dies' (starts its jobs, never finishes them)."""
    await r.xgroup_create(STREAM, keys.GROUP, id="0", mkstream=True)
    [[_, entries]] = await r.xreadgroup(keys.GROUP, DEAD, {STREAM: ">"}, count=n)
    await JobStore(r).start([fields["job_id"] for _, fields in entries], time.time(), DEAD)
    return [eid for eid, _ in entries]


async def test_dead_workers_entries_are_rerun_after_the_lease(redis_url, redis_client):
    r = redis_client
    p = payload([5, 6, 7], max_tokens=3)
    await submit_job(r, p)
    [entry_id] = await read_as_dead_worker(r, 1)
    died_at = time.time()
    before = metric("tokenq_worker_reclaimed_entries_total")
    async with running(redis_url, FakeEngine(), lease_s=1.0):
        h = await final_state(r, p.id)
    assert h[f.STATE] == "succeeded" and h[f.ATTEMPTS] == "2" and h[f.WORKER] == "test-host:1"
    assert JobResult.model_validate_json(h[f.RESULT]).text == expected_text([5, 6, 7], 3)
    assert float(h[f.STARTED_AT]) - died_at >= 1.0  # not before the lease lapsed
    assert metric("tokenq_worker_reclaimed_entries_total") == before + 1
    assert await r.xlen(STREAM) == 0 and (await r.xpending(STREAM, keys.GROUP))["pending"] == 0
    assert await r.xlen(keys.dead_stream(MODEL)) == 0
    assert entry_id


async def test_claims_no_more_than_the_engine_admits(redis_url, redis_client):
    r = redis_client
    jobs = [payload(list(range(1, 20))) for _ in range(6)]
    for p in jobs:
        await submit_job(r, p)
    await read_as_dead_worker(r, 6)
    await asyncio.sleep(0.5)
    engine = FakeEngine(capacity=2, step_sleep=0.01)
    async with running(redis_url, engine, lease_s=0.5):
        async def all_done() -> bool:
            states = [await r.hget(keys.job_key(p.id), f.STATE) for p in jobs]
            return all(s == "succeeded" for s in states)

        await wait_until(all_done, timeout=20)
    # What the worker claimed went to the engine, which held as many as it admits and never more. (The
    # group's pending count is no measure of claims: a job the engine has finished stays pending until the
    # publisher has written its result and acknowledged it, while its slot is already claimed again.)
    assert len(engine.added) == 6
    assert engine.peak == 2
    assert await r.xlen(STREAM) == 0


async def test_running_entries_keep_their_lease(redis_url, redis_client):
    """A live worker's entries never idle past the lease, so nobody can claim them while it runs them."""
    r = redis_client
    p = payload(list(range(1, 200)))  # ~200 steps of 10 ms: runs for several leases
    await submit_job(r, p)
    lease_ms = 600
    async with running(redis_url, FakeEngine(step_sleep=0.01), lease_s=lease_ms / 1000):
        await wait_until(lambda: _state_is(r, p.id, "running"), timeout=5)
        idles = []
        while await r.hget(keys.job_key(p.id), f.STATE) == "running":
            [entry] = await r.xpending_range(STREAM, keys.GROUP, "-", "+", 1) or [None]
            if entry is None:
                break
            idles.append(entry["time_since_delivered"])
            _, claimed, _ = await r.xautoclaim(STREAM, keys.GROUP, "thief", min_idle_time=lease_ms, count=10)
            assert claimed == []
            await asyncio.sleep(0.05)
        h = await final_state(r, p.id)
    assert len(idles) > 20 and max(idles) < lease_ms
    assert h[f.STATE] == "succeeded" and h[f.ATTEMPTS] == "1"


async def test_lost_lease_stops_the_local_copy(redis_url, redis_client):
    """If another worker took an entry over (our lease had lapsed), we abort our copy and write nothing."""
    r = redis_client
    p = payload(list(range(1, 300)))
    await submit_job(r, p)
    engine = FakeEngine(step_sleep=0.01)
    async with running(redis_url, engine, lease_s=0.6):
        await wait_until(lambda: _state_is(r, p.id, "running"))
        [entry] = await r.xpending_range(STREAM, keys.GROUP, "-", "+", 1)
        await r.xclaim(STREAM, keys.GROUP, "other-host:9", 0, [entry["message_id"]], justid=True)
        await wait_until(lambda: _true(p.id in engine.aborted or not engine.requests), timeout=3)
        await asyncio.sleep(0.3)
        h = await r.hgetall(keys.job_key(p.id))
    assert h[f.STATE] == "running" and f.RESULT not in h
    [entry] = await r.xpending_range(STREAM, keys.GROUP, "-", "+", 1)
    assert entry["consumer"] == "other-host:9"  # still theirs: we did not take it back


async def test_delivery_limit_dead_letters_and_fails_the_job(redis_url, redis_client):
    r = redis_client
    p = payload([1, 2, 3])
    await submit_job(r, p)
    [entry_id] = await read_as_dead_worker(r, 1)
    # Two more workers died running it: delivered 3 times; the next claim passes the limit of 3.
    await r.xclaim(STREAM, keys.GROUP, DEAD, 0, [entry_id], idle=10_000, retrycount=3, justid=True)
    before = metric("tokenq_worker_dead_lettered_total")
    engine = FakeEngine()
    async with running(redis_url, engine, lease_s=1.0, max_deliveries=3):
        h = await final_state(r, p.id)
    assert h[f.STATE] == "failed"
    err = json.loads(h[f.ERROR])
    assert err["type"] == "max_deliveries_exceeded" and "delivered 4 times" in err["message"]
    [(_, dead)] = await r.xrange(keys.dead_stream(MODEL))
    assert dead == {"job_id": p.id, "stream": STREAM, "entry_id": entry_id, "deliveries": "4",
                    "reason": err["message"]}
    assert engine.added == []
    assert await r.xlen(STREAM) == 0 and (await r.xpending(STREAM, keys.GROUP))["pending"] == 0
    assert metric("tokenq_worker_dead_lettered_total") == before + 1
    assert await r.get(keys.tenant_queued_key(p.tenant, MODEL)) == "0"


async def test_stale_entry_of_a_final_job_is_dropped_and_counted(redis_url, redis_client):
    """A worker died between its final write and XACK: the job is not run again, nor dead-lettered; the
    late final write is dropped and counted."""
    r = redis_client
    ran, limit = payload([1, 2]), payload([3, 4])
    for p in (ran, limit):
        await submit_job(r, p)
    ids = await read_as_dead_worker(r, 2)
    for p in (ran, limit):
        await r.hset(keys.job_key(p.id), mapping={f.STATE: "succeeded", f.RESULT: "{}"})
    await r.xclaim(STREAM, keys.GROUP, DEAD, 0, [ids[1]], idle=10_000, retrycount=3, justid=True)
    before = metric("tokenq_duplicate_final_writes_total")
    engine = FakeEngine()
    async with running(redis_url, engine, lease_s=0.5, max_deliveries=3):
        await wait_until(lambda: _xlen_is(r, STREAM, 0), timeout=5)
    assert engine.added == []
    assert await r.xlen(keys.dead_stream(MODEL)) == 0
    assert metric("tokenq_duplicate_final_writes_total") == before + 1  # the dead-letter's failed write
    for p in (ran, limit):
        h = await r.hgetall(keys.job_key(p.id))
        assert h[f.STATE] == "succeeded" and h[f.RESULT] == "{}"


async def test_drained_jobs_are_taken_over_at_once(redis_url, redis_client):
    """SIGTERM-style stop with a short grace: the unfinished jobs are handed back and another worker,
    whose lease is 30 s, runs them right away."""
    r = redis_client
    jobs = [payload(list(range(1, 150))) for _ in range(2)]
    for p in jobs:
        await submit_job(r, p)
    async with running(redis_url, FakeEngine(step_sleep=0.02), worker_id="a-host:1", grace_s=0.2, lease_s=30):
        await wait_until(lambda: _all_state(r, jobs, "running"))
    stopped = time.monotonic()
    async with running(redis_url, FakeEngine(step_sleep=0.001), worker_id="b-host:2", lease_s=30):
        for p in jobs:
            h = await final_state(r, p.id)
            assert h[f.STATE] == "succeeded" and h[f.WORKER] == "b-host:2" and h[f.ATTEMPTS] == "2"
    assert time.monotonic() - stopped < 10  # far less than the 30 s lease
    assert await r.xlen(STREAM) == 0


async def test_a_job_cancelled_as_its_worker_drained_ends_cancelled_on_the_next_worker(redis_url, redis_client):
    """A cancel asked while the job ran (the flag set), the worker handing it back before it acted on it: the
    hand-back made it `queued` with the flag kept, and the next worker dropped its entry without ending it, so
    it stayed `queued` for good (its tenant's queued count with it)."""
    r = redis_client
    job = payload(list(range(1, 150)))
    await submit_job(r, job)
    async with running(redis_url, FakeEngine(step_sleep=0.02), worker_id="a-host:1", grace_s=0.2, lease_s=30):
        await wait_until(lambda: _all_state(r, [job], "running"))
    assert await _state_is(r, job.id, "queued")  # handed back
    await r.hset(keys.job_key(job.id), f.CANCEL_REQUESTED, "1")  # DELETE's flag, which the drain outran
    async with running(redis_url, FakeEngine(step_sleep=0.001), worker_id="b-host:2", lease_s=30):
        h = await final_state(r, job.id)
    assert h[f.STATE] == "cancelled"
    assert await r.xlen(STREAM) == 0


async def _state_is(r, job_id: str, state: str) -> bool:
    return await r.hget(keys.job_key(job_id), f.STATE) == state


async def _all_state(r, jobs, state: str) -> bool:
    return all([await _state_is(r, p.id, state) for p in jobs])


async def _xlen_is(r, stream: str, n: int) -> bool:
    return await r.xlen(stream) == n


async def _true(value: bool) -> bool:
    return value


async def test_heartbeat_writes_the_card_again_when_redis_lost_it(redis_client):
    from tests.integration.test_worker_service import CARD
    from worker.engine_loop import EngineLoop
    from worker.heartbeat import Heartbeat

    r = redis_client
    hb = Heartbeat(r, "hb:1", CARD, EngineLoop(FakeEngine()), capacity=4)
    await hb.start()
    await r.delete(keys.model_card_key(MODEL))  # a Redis restart without persistence
    await hb.beat()
    assert await r.hget(keys.model_card_key(MODEL), "card") == CARD.model_dump_json()


SERVE = """
import sys
from protocol.workers import ModelCard
from tests.fakes import FakeEngine
from worker.service import serve
serve(sys.argv[1], "fake-model", FakeEngine(step_sleep=0.05), ModelCard(name="fake-model", max_model_len=2048,
      tokenizer_json=""), worker_id="term-host:1")
"""


async def test_sigterm_drains_within_the_grace_and_hands_back(redis_url, redis_client):
    """A real process: SIGTERM, a job that cannot finish in TOKENQ_DRAIN_GRACE_S, a short one that can."""
    import os
    import signal
    import subprocess
    import sys

    r = redis_client
    long, short = payload(list(range(1, 200))), payload(list(range(1, 30)))  # ~10 s and ~1.5 s
    for p in (long, short):
        await submit_job(r, p)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TOKENQ_DRAIN_GRACE_S": "3"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, redis_url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await wait_until(lambda: _all_state(r, [long, short], "running"), timeout=20)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = await asyncio.to_thread(proc.wait, 20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()
    assert rc == 0, out
    assert 2.5 < took < 6, took
    assert (await r.hget(keys.job_key(short.id), f.STATE)) == "succeeded"  # finished within the grace
    h = await r.hgetall(keys.job_key(long.id))
    assert h[f.STATE] == "queued" and f.RESULT not in h
    [entry] = await r.xpending_range(STREAM, keys.GROUP, "-", "+", 10)
    assert entry["time_since_delivered"] > 3600_000 and entry["times_delivered"] == 0
    assert "handed unfinished jobs back" in out


async def test_final_write_survives_a_redis_restart(tmp_path):
    """The job finishes in the engine while Redis is down; its final write lands once Redis is back."""
    import redis.asyncio as aioredis

    from tests.processes import RestartableRedis

    red = RestartableRedis(tmp_path)
    red.start()
    r = aioredis.from_url(red.url, decode_responses=True)
    prompt = list(range(1, 50))  # ~1 s in the engine
    p = payload(prompt)
    await submit_job(r, p)
    try:
        engine = FakeEngine(step_sleep=0.02)
        async with running(red.url, engine, lease_s=30):
            await wait_until(lambda: _state_is(r, p.id, "running"))
            await r.aclose()
            red.kill()
            await asyncio.sleep(2.0)
            assert not engine.requests  # done in the engine while Redis was away
            red.start()
            r = aioredis.from_url(red.url, decode_responses=True)
            h = await final_state(r, p.id, timeout=20)
        assert h[f.STATE] == "succeeded" and h[f.ATTEMPTS] == "1"
        assert JobResult.model_validate_json(h[f.RESULT]).text == expected_text(prompt, 256)
        assert await r.xlen(STREAM) == 0
    finally:
        await r.aclose()
        red.kill()


async def test_a_job_cancelled_while_its_worker_was_dead_is_not_run_again(redis_url, redis_client):
    """DELETE of a running job whose worker is gone: the next worker ends it `cancelled` with the text the
    dead one published, instead of running it again (which threw that text away)."""
    from jobstore import DeltaWrite, JobRef
    from protocol.events import DeltaEvent

    r = redis_client
    p = payload([5, 6, 7], max_tokens=50)
    await submit_job(r, p)
    await read_as_dead_worker(r, 1)
    store = JobStore(r)
    event = DeltaEvent(seq=1, offset=0, text="so far").model_dump_json()
    await store.write([DeltaWrite(p.id, "so far", 1, event, "", 2)], [])
    assert await store.cancel(JobRef.of(p)) == "running"  # the flag is set; no live worker reads it
    async with running(redis_url, FakeEngine(), lease_s=1.0):
        h = await final_state(r, p.id)
    assert h[f.STATE] == "cancelled" and h[f.ATTEMPTS] == "1" and h[f.WORKER] == DEAD
    result = JobResult.model_validate_json(h[f.RESULT])
    assert result.text == "so far" and result.finish_reason == "abort" and result.usage.completion_tokens == 2
    assert json.loads(h[f.ERROR])["type"] == "cancelled"
    assert await r.xlen(STREAM) == 0 and (await r.xpending(STREAM, keys.GROUP))["pending"] == 0
