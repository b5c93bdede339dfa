"""gateway.jobs.follow against hand-written Redis traffic: snapshots, gaps and missed messages."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from gateway import jobs
from gateway.jobs import Delta, Final, Restarted
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


async def collect(r, offset: int = 0) -> tuple[str, list[Delta], Final | Restarted]:
    deltas, final = [], None
    async for item in jobs.follow(r, JOB, offset):
        if isinstance(item, Delta):
            deltas.append(item)
        elif isinstance(item, Final | Restarted):
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


async def started(r) -> None:
    for _ in range(100):  # follow has subscribed and set the flag
        if await r.hget(keys.job_key(JOB), "streamed") == "1":
            return
        await asyncio.sleep(0.01)


async def first_attempt_then_reclaim(r, reader) -> asyncio.Task:
    """`reader` follows a job whose first attempt wrote "Once upon" before its worker stopped; the reclaim
    has cleared that text (the next attempt starts at offset 0)."""
    await hset(r, {"state": "running", "seq": "1", "streamed": "0"})
    task = asyncio.create_task(reader)
    await started(r)
    await publish_delta(r, 2, 0, "Once upon", "Once upon")
    await asyncio.sleep(0.05)
    await hset(r, {"state": "running", "text": "", "seq": "3"})
    return task


@pytest.mark.parametrize("lost", [False, True])
async def test_a_new_attempt_of_other_text_ends_the_following(redis_client, lost):
    """A worker drained mid-job: the next attempt starts from offset 0. Its text was appended after the
    reader's offset, so the reader got the first attempt's start and the second's end as one answer."""
    r = redis_client
    task = await first_attempt_then_reclaim(r, collect(r))
    if lost:  # the new attempt's deltas missed: the snapshot or the result shows it
        await finish(r, 9, "In a land far away")
    else:
        await publish_delta(r, 4, 0, "In a land", "In a land")
        await publish_delta(r, 5, 9, " far away", "In a land far away")
    text, _, end = await asyncio.wait_for(task, 5)
    assert text == "Once upon" and isinstance(end, Restarted)


@pytest.mark.parametrize("result", ["", "Once"])
async def test_a_new_attempt_that_ends_sooner_ends_the_following(redis_client, result):
    """The next attempt ends (at an end-of-text token, or cancelled after its first tokens) before the text the
    reader was given: its result is shorter, so the reader's text is not the job's answer."""
    r = redis_client
    task = await first_attempt_then_reclaim(r, collect(r))
    await finish(r, 4, result)
    text, _, end = await asyncio.wait_for(task, 5)
    assert text == "Once upon" and isinstance(end, Restarted)


async def test_a_new_attempt_of_the_same_text_is_followed_on(redis_client):
    """A greedy job writes the same text again: the reader loses nothing and gets nothing twice."""
    r = redis_client
    task = await first_attempt_then_reclaim(r, collect(r))
    await publish_delta(r, 4, 0, "Once", "Once")
    await publish_delta(r, 5, 4, " upon a time", "Once upon a time")
    await finish(r, 6, "Once upon a time.")
    text, _, final = await asyncio.wait_for(task, 5)
    assert text == "Once upon a time." and isinstance(final, Final)


async def test_job_events_say_restart_and_start_again_at_zero(redis_client):
    from gateway.sse import job_events

    r = redis_client

    async def lines() -> list[str]:
        return [line async for line in job_events(r, JOB, [(0, 0)]) if line.startswith("id:")]

    task = await first_attempt_then_reclaim(r, lines())
    await publish_delta(r, 4, 0, "In a land", "In a land")
    await asyncio.sleep(0.2)
    await finish(r, 5, "In a land far away")
    events = [(e.split("\n")[0], e.split("\n")[1]) for e in await asyncio.wait_for(task, 5)]
    assert [name for _, name in events] == ["event: delta", "event: restart", "event: delta", "event: delta",
                                            "event: done"]
    assert events[1][0] == "id: 0.00000000" and events[-1][0] == f"id: 18.{zlib.crc32(b'In a land far away'):08x}"


async def resumed_events(r, last_event_id: str) -> list[tuple[str, str]]:
    """(id line, event line) of the job's events as a reader resuming with `last_event_id` gets them."""
    from gateway.sse import job_events, parse_event_id

    resume = parse_event_id(last_event_id)
    return [(e.split("\n")[0], e.split("\n")[1]) async for e in job_events(r, JOB, resume) if e.startswith("id:")]


def id_after(text: str) -> str:
    return f"{len(text)}.{zlib.crc32(text.encode()):08x}"


@pytest.mark.parametrize("reached", [True, False])
async def test_a_reader_resuming_after_its_job_began_again_with_other_text_gets_a_restart(redis_client, reached):
    """It read "Once upon" of the first attempt on one gateway, then resumes on another with that event's id.
    The second attempt writes other text, and has (or has not yet) reached the reader's offset: the reader
    gets a restart, never the new text spliced onto the old (the id's digest is of the text it had)."""
    r = redis_client
    await hset(r, {"state": "running", "seq": "3", "streamed": "1", "text": "In a land" if reached else "In"})
    task = asyncio.create_task(resumed_events(r, id_after("Once upon")))
    await asyncio.sleep(0.2)
    if not reached:
        await publish_delta(r, 4, 2, " a land", "In a land")
        await asyncio.sleep(0.2)
    await finish(r, 5, "In a land far away")
    events = await asyncio.wait_for(task, 5)
    assert [name for _, name in events][:2] == ["event: restart", "event: delta"], events
    assert events[0][0] == "id: 0.00000000" and events[-1] == (f"id: {id_after('In a land far away')}", "event: done")


async def test_a_reader_resuming_on_the_same_text_goes_on_from_its_offset(redis_client):
    """A new attempt that wrote the same text (greedy), or no new attempt: the rest, no restart."""
    r = redis_client
    await hset(r, {"state": "running", "seq": "3", "streamed": "1", "text": "Once"})
    task = asyncio.create_task(resumed_events(r, id_after("Once upon")))
    await asyncio.sleep(0.2)
    await publish_delta(r, 4, 4, " upon a", "Once upon a")
    await asyncio.sleep(0.2)
    await finish(r, 5, "Once upon a time")
    events = await asyncio.wait_for(task, 5)
    assert [name for _, name in events] == ["event: delta", "event: delta", "event: done"], events
    assert events[-1][0] == f"id: {id_after('Once upon a time')}"


@pytest.mark.parametrize("attempts", ["1", "2"])
async def test_an_id_without_a_digest_is_checked_by_the_only_attempts_text(redis_client, attempts):
    """Ids as they were before their digest: while the job has had one attempt its text is the reader's, so
    the reader resumes at its offset, with checked ids; after a second one it cannot be checked: restart."""
    r = redis_client
    await hset(r, {"attempts": attempts})
    await finish(r, 5, "In a land far away")
    events = await asyncio.wait_for(resumed_events(r, "9"), 5)
    names = ["event: delta", "event: done"] if attempts == "1" else ["event: restart", "event: delta", "event: done"]
    assert [name for _, name in events] == names and events[-1][0] == f"id: {id_after('In a land far away')}"
