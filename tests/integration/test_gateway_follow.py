"""gateway.jobs.follow against hand-written Redis traffic: snapshots, gaps and missed messages."""

from __future__ import annotations

import asyncio

import pytest

from gateway import jobs
from gateway.jobs import Delta, Final
from protocol import keys
from protocol.events import DeltaEvent, StateEvent
from protocol.jobs import JobResult, JobState, Usage

JOB = "job_follow"


def put(pipe, mapping: dict[str, str]) -> None:
    """Write the job's hash fields, its text (a key of its own) when given."""
    fields = dict(mapping)
    if "text" in fields:
        pipe.set(keys.job_text_key(JOB), fields.pop("text"))
    pipe.hset(keys.job_key(JOB), mapping=fields)


async def hset(r, mapping: dict[str, str]) -> None:
    async with r.pipeline(transaction=True) as pipe:
        put(pipe, mapping)
        await pipe.execute()


async def publish_delta(r, seq: int, offset: int, text: str, full: str) -> None:
    async with r.pipeline(transaction=True) as pipe:
        put(pipe, {"text": full, "seq": str(seq)})
        pipe.publish(keys.events_channel(JOB), DeltaEvent(seq=seq, offset=offset, text=text).model_dump_json())
        await pipe.execute()


async def finish(r, seq: int, text: str) -> None:
    result = JobResult(text=text, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1,
                                                                    total_tokens=2))
    await hset(r, {"state": "succeeded", "result": result.model_dump_json(), "text": text, "seq": str(seq)})
    await r.publish(keys.events_channel(JOB), StateEvent(seq=seq, state=JobState.succeeded,
                                                         result=result).model_dump_json())


async def collect(r, offset: int = 0) -> tuple[str, list[Delta], Final]:
    deltas, final = [], None
    async for item in jobs.follow(r, JOB, offset):
        if isinstance(item, Delta):
            deltas.append(item)
        elif isinstance(item, Final):
            final = item
    return "".join(d.text for d in deltas), deltas, final


@pytest.fixture(autouse=True)
def fast_recheck(monkeypatch):
    monkeypatch.setattr(jobs, "RECHECK_S", 0.1)


async def test_snapshot_then_events_then_gap_then_missed_final(redis_client):
    r = redis_client
    await hset(r, {"state": "running", "text": "abc", "seq": "3", "streamed": "0"})
    task = asyncio.create_task(collect(r, offset=1))
    for _ in range(100):  # follow has subscribed and set the flag
        if await r.hget(keys.job_key(JOB), "streamed") == "1":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await publish_delta(r, 3, 2, "c", "abc")  # old: already in the snapshot
    await publish_delta(r, 4, 3, "de", "abcde")
    # A lost message: the hash moves on, nothing is published; then a later delta shows the gap.
    await hset(r, {"text": "abcdefg", "seq": "5"})
    await publish_delta(r, 6, 7, "h", "abcdefgh")
    await asyncio.sleep(0.3)
    await hset(r, {"state": "succeeded", "text": "abcdefghi", "seq": "7",
                                             "result": JobResult(text="abcdefghi", finish_reason="stop", usage=Usage(
                                                 prompt_tokens=1, completion_tokens=1, total_tokens=2)
                                             ).model_dump_json()})  # final event lost too
    text, deltas, final = await asyncio.wait_for(task, 5)
    assert text == "bcdefghi"
    at = 1
    for d in deltas:
        assert d.offset == at
        at = d.end
    assert final.state == JobState.succeeded and final.result.text == "abcdefghi"


async def test_final_event_carries_the_tail(redis_client):
    r = redis_client
    await hset(r, {"state": "queued", "seq": "0", "streamed": "0"})
    task = asyncio.create_task(collect(r))
    await asyncio.sleep(0.05)
    await publish_delta(r, 1, 0, "he", "he")
    await finish(r, 2, "hello")
    text, _, final = await asyncio.wait_for(task, 5)
    assert text == "hello" and final.state == JobState.succeeded


async def test_wait_final_without_deltas(redis_client):
    r = redis_client
    await hset(r, {"state": "queued", "seq": "0", "streamed": "0"})
    task = asyncio.create_task(jobs.wait_final(r, JOB))
    await asyncio.sleep(0.05)
    await finish(r, 1, "done")
    final = await asyncio.wait_for(task, 5)
    assert final.result.text == "done"
    assert await r.hget(keys.job_key(JOB), "streamed") == "0"  # a plain waiter asks for no deltas


async def test_snapshots_go_through_the_given_store(redis_client):
    """The gateway's followers read snapshots through its store, whose scripts travel on the shared pipelined
    connection (jobstore/pipe.py): a script, not a redis-py MULTI."""
    from jobstore import JobStore, scripts
    from jobstore.pipe import RedisPipe

    class Counting(RedisPipe):
        sent: list[str] = []

        async def evalsha(self, script, keys_, args):
            self.sent.append(script.sha)
            return await super().evalsha(script, keys_, args)

    r = redis_client
    await hset(r, {"state": "running", "text": "Hel", "seq": "1"})
    pipe = Counting(r, 1, 5.0)
    try:
        seen = []
        async for item in jobs.follow(r, JOB, mark=False, store=JobStore(r, scripts=pipe)):
            seen.append(item)
            if isinstance(item, Delta):
                await finish(r, 2, "Hello")
            if isinstance(item, Final):
                break
    finally:
        await pipe.aclose()
    assert "".join(d.text for d in seen if isinstance(d, Delta)) == "Hello"
    assert isinstance(seen[-1], Final) and seen[-1].state == JobState.succeeded
    assert scripts.SNAPSHOT.sha in pipe.sent
