"""Resuming a job's events with a bare offset (`Last-Event-ID: 9`, an id from before ids carried the text's
digest), through the gateway's route against a real Redis. The test runs the job's attempts itself, writing
them as a worker does (jobstore): an attempt starts (START: `attempts` goes up, the text is dropped), writes
its text, and the last one finishes."""

from __future__ import annotations

import asyncio
import json
import time
import zlib

import httpx
import pytest

from gateway.app import create_app
from jobstore import DeltaWrite, FinalWrite, JobRef, JobStore
from protocol import choice_text, keys
from protocol import job_record as F
from protocol.events import DeltaEvent
from protocol.jobs import Choice, JobResult, Usage
from tests.integration.fake_worker import MODEL, FakeWorker

FIRST = "Once upon a time"
SECOND = "In a land far away"


@pytest.fixture
async def client(redis_url, redis_client, default_model_dir):
    """The gateway, its model served by a worker that takes no jobs (the test runs them)."""
    idle = FakeWorker(redis_url, default_model_dir, capacity=0)
    await idle.start()
    app = create_app(redis_url)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as c:
        yield c
    await idle.stop()


async def submit(client: httpx.AsyncClient, n: int = 1) -> str:
    r = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "a b c", "n": n, "seed": 1})
    assert r.status_code in (200, 201, 202), r.text
    return r.json()["id"]


async def attempt(store: JobStore, job_id: str, texts: list[str], finish: bool) -> None:
    """One attempt of the job writing each choice's text; `finish`: it ends the job with that text."""
    [started] = await store.start([job_id], time.time(), "test-worker")
    seq = started.seq
    for index, text in enumerate(texts):
        seq += 1
        event = DeltaEvent(seq=seq, offset=0, index=index, text=text).model_dump_json()
        await store.write([DeltaWrite(job_id, choice_text.stored(index, text, len(texts)), seq, event)], [])
    if finish:
        usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
        choices = [Choice(index=i, text=t, finish_reason="stop") for i, t in enumerate(texts)]
        result = JobResult(text=texts[0], finish_reason="stop", usage=usage, choices=choices if len(texts) > 1 else None)
        ref = JobRef.of_record(job_id, await store.read(job_id))
        await store.write([], [FinalWrite(ref, "succeeded", result.model_dump_json(), finished_at=time.time())])


async def events(client: httpx.AsyncClient, job_id: str, last_event_id: str) -> list[tuple[str, str, dict]]:
    """(id, event, data) of each event the route sends a reader resuming with `last_event_id`."""
    r = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_event_id})
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if "data" in fields:
            out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


async def following(r, job_id: str) -> None:
    """Waits until a reader follows the job (it flags the job `streamed` once it has resumed)."""
    for _ in range(500):
        if await r.hget(keys.job_key(job_id), F.STREAMED) == "1":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody follows the job")


def checked_id(*texts: str) -> str:
    return ",".join(f"{len(t)}.{zlib.crc32(t.encode()):08x}" for t in texts)


async def test_a_bare_id_after_a_second_attempt_restarts_from_the_start(client, redis_client):
    """The reader had the first attempt's text up to 9; the second attempt wrote other text. Resuming at 9
    would splice the two (`Once upon` + `far away`): the reader gets a restart, then the whole new text."""
    job_id = await submit(client)
    store = JobStore(redis_client)
    await attempt(store, job_id, [FIRST], finish=False)
    await attempt(store, job_id, [SECOND], finish=True)
    got = await events(client, job_id, "9")
    assert [(i, e) for i, e, _ in got] == [("0.00000000", "restart"), (checked_id(SECOND), "delta"),
                                           (checked_id(SECOND), "done")]
    assert got[0][2]["code"] == "job_restarted"
    assert got[1][2] == {"text": SECOND, "offset": 0, "index": 0}


async def test_a_bare_id_of_a_single_attempt_resumes_at_its_offset_with_checked_ids(client, redis_client):
    job_id = await submit(client)
    await attempt(JobStore(redis_client), job_id, [FIRST], finish=True)
    got = await events(client, job_id, "9")
    assert [(i, e) for i, e, _ in got] == [(checked_id(FIRST), "delta"), (checked_id(FIRST), "done")]
    assert got[0][2] == {"text": FIRST[9:], "offset": 9, "index": 0}


async def test_a_bare_id_checked_on_resume_catches_an_attempt_that_begins_after_it(client, redis_client):
    """One attempt when the reader resumes: its text is the reader's, so the stream goes on from 9 with
    checked ids, and a second attempt of other text that begins meanwhile gets the reader a restart."""
    job_id = await submit(client)
    store = JobStore(redis_client)
    await attempt(store, job_id, [FIRST[:12]], finish=False)
    reader = asyncio.create_task(events(client, job_id, "9"))
    await following(redis_client, job_id)
    await attempt(store, job_id, [SECOND], finish=True)
    got = await asyncio.wait_for(reader, 10)
    assert [(i, e) for i, e, _ in got] == [(checked_id(FIRST[:12]), "delta"), ("0.00000000", "restart"),
                                           (checked_id(SECOND), "delta"), (checked_id(SECOND), "done")]


async def test_bare_ids_of_several_choices_restart_after_a_second_attempt(client, redis_client):
    job_id = await submit(client, n=2)
    store = JobStore(redis_client)
    await attempt(store, job_id, [FIRST, FIRST[:5]], finish=False)
    await attempt(store, job_id, [SECOND, SECOND[:5]], finish=True)
    got = await events(client, job_id, "9,4")
    assert got[0][:2] == ("0.00000000,0.00000000", "restart")
    assert got[-1][:2] == (checked_id(SECOND, SECOND[:5]), "done")
    assert {d["index"]: (d["offset"], d["text"]) for _, e, d in got if e == "delta"} == {
        0: (0, SECOND), 1: (0, SECOND[:5])}


async def test_bare_ids_of_several_choices_of_a_single_attempt_resume_with_checked_ids(client, redis_client):
    job_id = await submit(client, n=2)
    await attempt(JobStore(redis_client), job_id, [FIRST, FIRST[:5]], finish=True)
    got = await events(client, job_id, "9,4")
    assert [e for _, e, _ in got] == ["delta", "delta", "done"]
    assert got[-1][0] == checked_id(FIRST, FIRST[:5])
    assert [(d["index"], d["offset"], d["text"]) for _, e, d in got if e == "delta"] == [
        (0, 9, FIRST[9:]), (1, 4, FIRST[4:5])]
