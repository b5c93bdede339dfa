"""A job of several choices through the worker (the fake engine) and the job store: one job, each choice's
text streamed and stored apart (the text log), read back per choice by the gateway's follow, resumed from
per-choice offsets, and a running job past its deadline expired by the store with each choice's text."""

from __future__ import annotations

import json
import time

from gateway.jobs import Delta, Final, follow
from jobstore import DeltaWrite, JobRef, JobStore
from protocol import choice_text, keys
from protocol import job_record as f
from protocol.events import DeltaEvent
from protocol.jobs import JobResult
from tests.fakes import FakeEngine, expected_text, submit_job
from tests.integration import test_worker_service as svc

PROMPT = [3, 4, 5, 6]


async def _follow(r, job_id, offset=0):
    texts: dict[int, str] = {}
    final = None
    async for item in follow(r, job_id, offset):
        if isinstance(item, Delta):
            assert item.offset == len(texts.get(item.index, "")) or offset != 0
            texts[item.index] = texts.get(item.index, "") + item.text
        elif isinstance(item, Final):
            final = item
    return texts, final


async def test_one_job_carries_n_choices_streamed_apart(redis_url, redis_client):
    r = redis_client
    p = svc.payload(PROMPT, max_tokens=3, stream=True, n=3, stop_token_ids=[6])
    await submit_job(r, p, streamed=True)
    async with svc.running(redis_url, FakeEngine()):
        texts, final = await _follow(r, p.id)
    assert final.state.value == "succeeded"
    # Choice i echoes each prompt id plus i: choice 1 meets stop token 6 (5 + 1) at its third token,
    # choice 2 (4 + 2) at its second.
    want = {0: expected_text(PROMPT, 3), 1: "t4 t5 t6 ", 2: "t5 t6 "}
    assert texts == want
    result = final.result
    assert [(c.index, c.text, c.finish_reason, c.stop_reason) for c in result.all_choices()] == [
        (0, want[0], "length", None), (1, want[1], "stop", 6), (2, want[2], "stop", 6)]
    assert result.usage.completion_tokens == 8 and result.text == want[0]
    # The hash: n, and the text as a log of per-choice records that splits back into each choice's text.
    assert await r.hget(keys.job_key(p.id), f.CHOICES) == "3"
    log = await r.get(keys.job_text_key(p.id))
    assert choice_text.split(log, 3) == [want[0], want[1], want[2]]
    # A reader that resumes from per-choice offsets gets the rest only.
    rest, _ = await _follow(r, p.id, [3, 0, 4])
    assert rest == {0: want[0][3:], 1: want[1], 2: want[2][4:]}


async def test_a_running_job_of_several_choices_expires_with_each_choice_text(redis_client):
    store = JobStore(redis_client)
    now = time.time()
    p = svc.payload(PROMPT, max_tokens=3, n=2)
    p.deadline = now + 1
    await redis_client.sadd(keys.MODELS_SET, p.model)  # the sweep looks at the models a worker has served
    await store.submit(p, "{}", {}, streamed=True, now=now)
    await store.start([p.id], now, "w")
    rows = [(0, "alpha\n"), (1, "beta \u2028"), (0, " gamma")]
    writes = [DeltaWrite(p.id, choice_text.stored(i, text, 2), seq,
                         DeltaEvent(seq=seq, offset=0, index=i, text=text).model_dump_json())
              for seq, (i, text) in enumerate(rows, start=1)]
    await store.write(writes, [])
    assert (await store.snapshot(p.id))[1] == ["alpha\n gamma", "beta \u2028"]
    assert await store.expire_due(now + 5, grace_s=0.5) == 1
    result = JobResult.model_validate_json((await store.read(p.id))[f.RESULT])
    assert [(c.index, c.text, c.finish_reason) for c in result.all_choices()] == [
        (0, "alpha\n gamma", "abort"), (1, "beta \u2028", "abort")]
    assert result.text == "alpha\n gamma"
    assert json.loads((await store.read(p.id))[f.ERROR])["type"] == "deadline_exceeded"


async def test_cancel_stops_every_choice_and_keeps_their_text(redis_url, redis_client):
    r = redis_client
    p = svc.payload(list(range(3, 200)), max_tokens=150, n=2)
    await submit_job(r, p, streamed=True)
    engine = FakeEngine(step_sleep=0.02)
    async with svc.running(redis_url, engine):
        await svc.wait_until(lambda: r.get(keys.job_text_key(p.id)))
        await JobStore(r).cancel(JobRef.of(p))
        h = await svc.final_state(r, p.id)

        async def aborted() -> bool:  # every choice with it; the abort reaches the engine at its next step,
            return p.id not in engine.requests  # which the final write does not wait for

        await svc.wait_until(aborted, timeout=5.0)
    assert h[f.STATE] == "cancelled"
    result = JobResult.model_validate_json(h[f.RESULT])
    assert [c.finish_reason for c in result.all_choices()] == ["abort", "abort"]
    assert all(c.text for c in result.all_choices())
