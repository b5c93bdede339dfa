"""The worker around the real engine (tiny random model, in-process loop) with every sequence slot full of
batch-lane jobs: an interactive job is pulled and started at once (it preempts a batch line), finishes while
every batch line is still running, and the preempted lines still finish whole."""

from __future__ import annotations

import asyncio

import pytest

from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobPayload, JobResult, new_job_id
from protocol.sampling import SamplingParams
from tests.fakes import FakeEngine, started_intake, submit_job
from tests.integration.test_worker_service import MODEL, final_state, payload, wait_until
from worker.service import WorkerService

pytest.importorskip("torch")

SLOTS = 4
BATCH_TOKENS = 240  # steps each batch line needs: what an interactive job waited for before
URGENT_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from worker.models.random_weights import write_random_model_dir

    return write_random_model_dir("tiny", tmp_path_factory.mktemp("tiny"))


def _job(lane: str, prompt: list[int], max_tokens: int) -> JobPayload:
    return JobPayload(id=new_job_id("m"), model="m", kind="completion", prompt_token_ids=prompt, lane=lane,
                      sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def test_interactive_job_starts_while_batch_fills_every_slot(redis_url, redis_client, tiny_model_dir):
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(tiny_model_dir, EngineConfig(num_kv_blocks=256, max_model_len=512, max_num_seqs=SLOTS))
    first_token_step: dict[str, int] = {}
    step = engine.step

    def counting_step():
        outputs = step()
        for out in outputs:
            if out.new_token_ids:
                first_token_step.setdefault(out.request_id, service.engine_loop.steps)
        return outputs

    engine.step = counting_step
    batch = [_job("batch", [3 + i, 40 + i, 7, 9, 11], BATCH_TOKENS) for i in range(SLOTS + 2)]
    for p in batch:
        await submit_job(redis_client, p)
    service = WorkerService(redis_url, "m", engine, engine.model_card("m"), worker_id="prio:1", block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        # Every slot holds a batch line that has produced tokens; two more lines wait in Redis.
        async def slots_full() -> bool:
            return sum(p.id in first_token_step for p in batch) >= SLOTS

        await wait_until(slots_full, timeout=120)
        assert engine.scheduler.num_running == SLOTS
        urgent = _job("interactive", [5, 6, 7, 8], URGENT_TOKENS)
        submitted_at = service.engine_loop.steps
        await submit_job(redis_client, urgent)
        done = await final_state(redis_client, urgent.id, timeout=120)
        # Ordering, not time: the interactive job ended while no batch line had (each needs 240 steps).
        states = [await redis_client.hget(f"tokenq:job:{p.id}", f.STATE) for p in batch]
        assert done[f.STATE] == "succeeded"
        assert len(JobResult.model_validate_json(done[f.RESULT]).token_ids) == URGENT_TOKENS
        assert not any(s == "succeeded" for s in states), states
        waited = first_token_step[urgent.id] - submitted_at
        assert waited < BATCH_TOKENS // 4, f"first token {waited} engine steps after submission"
        assert engine.scheduler.num_preemptions >= 1
        results = [await final_state(redis_client, p.id, timeout=300) for p in batch]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    for h in results:  # the preempted line resumed and ran to its end, once
        assert h[f.STATE] == "succeeded"
        assert len(JobResult.model_validate_json(h[f.RESULT]).token_ids) == BATCH_TOKENS
    print(f"interactive first token {waited} engine steps after submission; "
          f"{engine.scheduler.num_preemptions} preemptions")


class _FullOfBatch(FakeEngine):
    """Room for better lanes only, as an engine whose slots all hold batch lines reports it."""

    def num_admissible(self, priority: int = 2) -> int:
        return 0 if priority == 2 else max(0, 2 - len(self.requests))


async def test_interactive_job_is_pulled_without_waiting_for_an_engine_step(redis_client):
    """The engine reports nothing (it runs nothing here) and the main loop waits for its room for a long
    block_ms: the better-lanes loop still takes an interactive job the moment it is queued, and leaves the
    batch lane's entries in Redis."""
    r = redis_client
    batch_job = payload([1, 2, 3], lane="batch")
    await submit_job(r, batch_job)
    # Known lanes first: the interactive tenant's stream exists, as it does once a tenant has used it.
    await submit_job(r, payload([9], lane="interactive", max_tokens=1))
    async with started_intake(r, MODEL, _FullOfBatch(step_sleep=0.001), block_ms=30_000) as (intake, _, engine):
        task = asyncio.create_task(intake.run())
        try:
            await wait_until(lambda: _count(engine, 0), timeout=10)
            urgent = payload([5, 6], lane="interactive", max_tokens=1)
            await submit_job(r, urgent)
            # Generous next to block_ms (30 s): a loop that waited for the engine's report would miss it.
            await wait_until(lambda: _has(engine, urgent.id), timeout=10)
            assert all(rid != batch_job.id for rid, _ in engine.added)
        finally:
            intake.stopped = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _count(engine: FakeEngine, priority: int) -> bool:
    return any(p == priority for _, p in engine.added)


async def _has(engine: FakeEngine, job_id: str) -> bool:
    return any(rid == job_id for rid, _ in engine.added)


async def test_a_new_tenant_stream_ends_a_blocked_read(redis_client):
    """A worker blocked on the streams it knows (for 30 s here) reads a new tenant's first job at
    once: submit announces the new stream and the blocking read watches for that."""
    r = redis_client
    await submit_job(r, payload([9], max_tokens=1).model_copy(update={"tenant": "known"}))
    async with started_intake(r, MODEL, FakeEngine(step_sleep=0.001), block_ms=30_000) as (intake, _, engine):
        intake.streams.refresh_s = 30.0  # nor its periodic re-read of the tenant sets
        task = asyncio.create_task(intake.run())
        try:
            await wait_until(lambda: _count(engine, 1), timeout=10)
            newcomer = payload([5, 6], max_tokens=1).model_copy(update={"tenant": "newcomer"})
            await submit_job(r, newcomer)
            # Generous next to block_ms (30 s): a read that knew only the old stream would miss it.
            await wait_until(lambda: _has(engine, newcomer.id), timeout=10)
            await submit_job(r, payload([7], max_tokens=1).model_copy(update={"tenant": "newcomer"}))
        finally:
            intake.stopped = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert await r.xlen(keys.new_tenants_stream(MODEL)) == 2  # each tenant's first job, not every job


async def test_a_cancelled_blocked_read_takes_no_entry(redis_client):
    """An intake cancelled while it blocks in XREADGROUP (a stopping worker) closes that read's connection:
    a job queued afterwards stays undelivered in the group, for the next worker to read at once, instead of
    going pending to a consumer that will never run it (until its lease)."""
    r = redis_client
    await submit_job(r, payload([9], max_tokens=1))
    async with started_intake(r, MODEL, FakeEngine(step_sleep=0.001), block_ms=30_000) as (intake, _, engine):
        intake.streams.refresh_s = 30.0  # nor does a re-read of the tenant sets end it sooner
        task = asyncio.create_task(intake.run())
        try:
            await wait_until(lambda: _count(engine, 1), timeout=10)
            await wait_until(lambda: _blocked_reads(r), timeout=10)
        finally:
            intake.stopped = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: _no_blocked_reads(r), timeout=5)  # the read's own block lasts 30 s
        late = payload([5, 6], max_tokens=1)
        await submit_job(r, late)
        stream = keys.jobs_stream(MODEL, late.lane, late.tenant)
        pending = await r.xpending(stream, keys.GROUP)
        assert pending["pending"] == 1  # the first job's entry only (the fake engine does not finish it here)
        [[_, [(_, fields)]]] = await r.xreadgroup(keys.GROUP, "host:2", {stream: ">"}, count=1)
        assert fields["job_id"] == late.id


async def _blocked_reads(r) -> bool:
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in await r.client_list())


async def _no_blocked_reads(r) -> bool:
    return not await _blocked_reads(r)
