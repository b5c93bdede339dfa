"""Reclaimed entries against a real Redis keep the lanes' order: jobs a draining worker handed back wait
behind a better lane's work, new or reclaimed, as new ones do; a better lane's handed-back job uses the room
its new jobs may take while batch lines fill the engine; the drain and the claims log a line each, not one
per job."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from jobstore import JobStore
from protocol import keys
from protocol.jobs import JobPayload
from tests.fakes import FakeEngine, started_intake, submit_job
from tests.integration.test_worker_service import MODEL, payload, wait_until
from worker.publisher import RunningJob
from worker.recovery import Recovery

DRAINED = "drained-host:1"
LONG = list(range(1, 60))  # runs for many engine steps: nothing finishes while the test looks


def job(lane: str, tenant: str = "default") -> JobPayload:
    return payload(LONG, lane=lane).model_copy(update={"tenant": tenant})


async def hand_back(r, jobs: list[JobPayload]) -> list[str]:
    """Queue `jobs`, run them on a worker that then drains (its recovery hands them back): their ids."""
    for p in jobs:
        await submit_job(r, p)
    by_id = {p.id: p for p in jobs}
    running: list[RunningJob] = []
    for stream in sorted({keys.jobs_stream(MODEL, p.lane, p.tenant) for p in jobs}):
        await r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        [[_, entries]] = await r.xreadgroup(keys.GROUP, DRAINED, {stream: ">"}, count=len(jobs))
        running += [RunningJob(payload=by_id[fields["job_id"]], stream=stream, entry_id=eid, streamed=False, seq=0,
                               started_at=time.time()) for eid, fields in entries]
    await JobStore(r).start([j.id for j in running], time.time(), DRAINED)
    assert await Recovery(r, MODEL, DRAINED, lease_s=30).release(running) == len(jobs)
    return [p.id for p in jobs]


def lanes_added(engine: FakeEngine) -> list[int]:
    return [priority for _, priority in engine.added]


async def test_handed_back_lower_lanes_wait_behind_new_interactive_jobs(redis_client):
    """The probe's restart: default and batch jobs handed back, interactive jobs still waiting. A worker with
    room for six takes the four interactive ones first, then two of the handed-back default jobs (queued
    before the new default one), and no batch line."""
    r = redis_client
    back_default = await hand_back(r, [job("default", t) for t in ("acme", "globex", "acme")])
    back_batch = await hand_back(r, [job("batch", t) for t in ("acme", "globex", "acme")])
    interactive = [job("interactive", t) for t in ("acme", "globex", "acme", "globex")]
    for p in [*interactive, job("default", "acme")]:
        await submit_job(r, p)
    recovery = Recovery(r, MODEL, "host:1", lease_s=30)
    engine = FakeEngine(capacity=6, step_sleep=0.01)
    async with started_intake(r, MODEL, engine, recovery=recovery) as (intake, _, _):
        with capture_logs() as logs:
            assert await intake.poll() == 6
        await wait_until(lambda: _added(engine, 6), timeout=5)
    assert lanes_added(engine) == [0, 0, 0, 0, 1, 1]
    assert {rid for rid, _ in engine.added[:4]} == {p.id for p in interactive}
    assert {rid for rid, _ in engine.added[4:]} <= set(back_default)
    assert not {rid for rid, _ in engine.added} & set(back_batch)
    reclaimed = [e for e in logs if "reclaimed" in e["event"] and e["log_level"] == "info"]
    assert [(e["event"], e["lane"], e["entries"]) for e in reclaimed] == [("reclaimed entries", "default", 2)]


class _FullOfBatch(FakeEngine):
    """Room for better lanes only, as an engine whose slots all hold batch lines reports it (the priority
    headroom: a better lane's job preempts one)."""

    def num_admissible(self, priority: int = 2) -> int:
        return 0 if priority == 2 else max(0, 2 - len(self.requests))


async def test_handed_back_interactive_job_is_taken_while_batch_fills_the_engine(redis_client):
    """The room a new interactive job may take while batch lines fill every slot is a handed-back one's too:
    it does not wait for a batch line to end."""
    r = redis_client
    [urgent] = await hand_back(r, [job("interactive")])
    await submit_job(r, job("batch"))
    recovery = Recovery(r, MODEL, "host:1", lease_s=30)
    engine = _FullOfBatch(step_sleep=0.01)
    async with started_intake(r, MODEL, engine, recovery=recovery, block_ms=30_000) as (intake, _, _):
        task = asyncio.create_task(intake.run())
        try:
            await wait_until(lambda: _added(engine, 1), timeout=5)
        finally:
            intake.stopped = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert engine.added == [(urgent, 0)]


async def test_a_drain_logs_how_many_it_handed_back_and_a_few_ids(redis_client):
    """A drain of many jobs is one short line: the count and the first ids, not every id."""
    with capture_logs() as logs:
        ids = await hand_back(redis_client, [job("interactive") for _ in range(45)])
    [line] = [e for e in logs if e["event"] == "handed unfinished jobs back"]
    assert line["jobs"] == 45 and line["released"] == 45
    assert line["job_ids"] == sorted(ids)[:20] and line["more"] == 25


async def _added(engine: FakeEngine, n: int) -> bool:
    return len(engine.added) >= n
