"""jobstore against a real Redis, a single node and a three-node cluster alike: appended deltas, writes to
missing jobs, deadlines applied on read and by the sweep, and the lane counters that admission and the
depth gauge share."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest

from gateway.app import create_app
from jobstore import DeltaWrite, FinalWrite, JobRef, JobStore, Limits, Refused, Started
from jobstore.pipe import RedisPipe
from protocol import job_record as F
from protocol import keys
from protocol.events import DeltaEvent
from protocol.jobs import JobPayload, JobResult, Usage, new_job_id
from protocol.sampling import SamplingParams
from tests.integration.test_gateway_tenants import MODEL, PROMPT, idle_worker_again


@pytest.fixture
async def idle_worker(store_client, default_model_dir):
    """A worker that looks alive and serves MODEL (so its deadlines are swept) but takes nothing."""
    await idle_worker_again(store_client)


def payload(tenant: str = "t", deadline: float | None = None, webhook: str | None = None,
            lane: str = "default") -> JobPayload:
    return JobPayload(id=new_job_id(MODEL), model=MODEL, kind="completion", prompt_token_ids=[1, 2, 3], tenant=tenant,
                      lane=lane, sampling=SamplingParams(max_tokens=4), deadline=deadline, webhook_url=webhook)


def delta(job_id: str, seq: int, offset: int, text: str) -> DeltaWrite:
    return DeltaWrite(job_id, text, seq, DeltaEvent(seq=seq, offset=offset, text=text).model_dump_json())


@pytest.mark.parametrize("via_pipe", [False, True])
async def test_deltas_append_and_a_retried_flush_is_not_appended_twice(store_client, via_pipe):
    """The same through redis-py and through the worker's shared pipelined connection."""
    pipe = RedisPipe(store_client, 1, 1.0) if via_pipe else None
    store = JobStore(store_client, pipe)
    p = payload()
    await store.submit(p, "{}", {}, streamed=True)
    await store.start([p.id], time.time(), "w")
    await store.write([delta(p.id, 1, 0, "hello ")], [])
    await store.write([delta(p.id, 2, 6, "wor")], [])
    await store.write([delta(p.id, 2, 6, "wor")], [])  # the same flush again, after a lost reply
    await store.write([delta(p.id, 3, 9, "ld")], [])
    record = await store.read(p.id)
    assert record[F.TEXT] == "hello world" and record[F.SEQ] == "3"
    assert await store.snapshot(p.id) == ("running", ["hello world"], 3, None, None)
    if pipe is not None:
        await pipe.aclose()


async def test_deltas_alone_are_published_in_order_then_the_final(redis_client):
    """A step's deltas alone go out as one script (no MULTI), through the pipe; the deltas and final write
    of the last step together still go out in one MULTI, after them."""
    pipe = RedisPipe(redis_client, 1, 1.0)
    store = JobStore(redis_client, pipe)
    p = payload()
    await store.submit(p, "{}", {}, streamed=True)
    await store.start([p.id], time.time(), "w")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.events_channel(p.id))
    await store.write([delta(p.id, 1, 0, "a")], [])
    await store.write([delta(p.id, 2, 1, "b")], [])
    result = JobResult(text="abc", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=3,
                                                                     total_tokens=6)).model_dump_json()
    assert await store.write([delta(p.id, 3, 2, "c")], [FinalWrite(JobRef.of(p), "succeeded", result)]) == [1]
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < 4 and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            event = json.loads(message["data"])
            seen.append(event.get("text") or event["state"])
    assert seen == ["a", "b", "c", "succeeded"]
    assert (await store.read(p.id))[F.SEQ] == "4"
    await pubsub.aclose()
    await pipe.aclose()


async def test_writes_to_a_missing_job_create_nothing(store_client):
    """A job hash that expired or was evicted is not recreated (without its tenant) by a late write."""
    store = JobStore(store_client)
    p = payload()
    ref = JobRef.of(p)
    result = JobResult(text="late", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1,
                                                                      total_tokens=2)).model_dump_json()
    assert await store.write([delta(p.id, 1, 0, "late")], [FinalWrite(ref, "succeeded", result)]) == [-1]
    assert await store.start([p.id], time.time(), "w") == [Started(-1)]
    await store.mark_streamed(p.id)
    assert await store.cancel(ref) == ""
    assert await store.expire(ref, time.time() + 100) == ""
    assert not await store.record_webhook_attempt(p.id, json.dumps({"outcome": "delivered"}))
    assert await store_client.keys(f"{keys.PREFIX}:*job:*") == []
    assert await store_client.get(keys.tenant_queued_key(p.tenant, MODEL)) is None


async def test_a_queued_job_past_its_deadline_reads_expired_without_a_worker(store_client):
    store = JobStore(store_client)
    now = time.time()
    p = payload(deadline=now + 1, webhook="https://example.com/hook")
    await store.submit(p, "{}", {}, streamed=False, limits=Limits(max_depth=10), now=now)
    assert (await store.read_current(p.id, now=now + 0.5))[F.STATE] == "queued"
    record = await store.read_current(p.id, now=now + 1.5)
    assert record[F.STATE] == "expired" and json.loads(record[F.ERROR])["type"] == "deadline_exceeded"
    assert await store_client.xlen(JobRef.of(p).stream) == 0  # its entry is gone with it
    assert await store_client.get(keys.tenant_queued_key(p.tenant, MODEL)) == "0"
    assert await store_client.hgetall(keys.lane_depth_key(MODEL, "default")) == {}
    assert await store_client.zcard(keys.deadlines_key(MODEL)) == 0
    [(_, fields)] = await store_client.xrange(keys.webhook_outbox(MODEL))
    assert fields == {"job_id": p.id, "state": "expired"}


async def test_the_sweep_expires_due_jobs_and_a_running_one_keeps_its_text(store_client):
    await store_client.sadd(keys.MODELS_SET, MODEL)  # the sweep looks at the models a worker has served
    store = JobStore(store_client)
    now = time.time()
    queued, running, later = payload(deadline=now + 1), payload(deadline=now + 1), payload(deadline=now + 60)
    for p in (queued, running, later):
        await store.submit(p, "{}", {}, streamed=True, now=now)
    await store.start([running.id], now, "w")
    await store.write([delta(running.id, 1, 0, "part")], [])
    await store.write([dataclasses.replace(delta(running.id, 2, 4, "ial"), output_tokens=2)], [])
    assert await store.expire_due(now + 1.1, grace_s=0.5) == 1  # the running job's worker gets its grace
    assert await store.expire_due(now + 1.6, grace_s=0.5) == 1
    assert await store.expire_due(now + 1.7) == 0
    states = [(await store.read(p.id))[F.STATE] for p in (queued, running, later)]
    assert states == ["expired", "expired", "queued"]
    result = JobResult.model_validate_json((await store.read(running.id))[F.RESULT])
    assert result.text == "partial" and result.finish_reason == "abort"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 2, 5)
    assert await store.depth(MODEL) == {"interactive": 0, "default": 1, "batch": 0}


async def test_a_late_delta_after_the_final_write_is_dropped(store_client):
    store = JobStore(store_client)
    p = payload()
    await store.submit(p, "{}", {}, streamed=True)
    await store.start([p.id], time.time(), "w")
    assert await store.write([delta(p.id, 1, 0, "a")], [FinalWrite(JobRef.of(p), "cancelled")]) == [1]
    await store.write([delta(p.id, 3, 1, "b")], [])
    assert (await store.read(p.id))[F.TEXT] == "a"


async def test_fair_share_lets_a_second_tenant_into_a_full_lane(store_client):
    store = JobStore(store_client)
    limits = Limits(max_depth=4)
    for _ in range(4):
        await store.submit(payload("big"), "{}", {}, False, limits)
    try:
        await store.submit(payload("big"), "{}", {}, False, limits)
        raise AssertionError("a tenant holding the whole full lane was admitted")
    except Refused as refused:
        assert refused.limit == "queue_full" and refused.value == 4
    for _ in range(2):
        await store.submit(payload("small"), "{}", {}, False, limits)
    try:
        await store.submit(payload("small"), "{}", {}, False, limits)
        raise AssertionError("a tenant past its fair share of a full lane was admitted")
    except Refused as refused:
        assert refused.value == 2  # 4 / 2 tenants
    await store.submit(payload("big", lane="batch"), "{}", {}, False, limits)  # other lanes are apart


async def test_gateway_reads_and_sweeps_expired_jobs(store_redis_url, store_client, idle_worker):
    """With no worker consuming: GET shows `expired` right past the deadline, and the gateway's sweep ends
    a job that nobody reads (so its webhook fires and counters go down)."""
    app = create_app(store_redis_url)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            read = (await c.post("/v1/jobs", json={**PROMPT, "ttl": 0.3})).json()["id"]
            unread = (await c.post("/v1/jobs", json={**PROMPT, "ttl": 0.3})).json()["id"]
            await asyncio.sleep(0.5)
            assert (await c.get(f"/v1/jobs/{read}")).json()["status"] == "expired"
            for _ in range(100):
                if await store_client.hget(keys.job_key(unread), F.STATE) == "expired":
                    break
                await asyncio.sleep(0.1)
            assert await store_client.hget(keys.job_key(unread), F.STATE) == "expired"
    assert await store_client.get(keys.tenant_queued_key("default", MODEL)) == "0"


async def test_a_rate_refusal_reports_a_count_that_explains_it(store_client):
    """The sliding window weighs the last minute's count by how much of it is still inside: a refusal reports
    that count rounded up, so that "used" plus the request is over the limit (it read "limit 3, used 2")."""
    store = JobStore(store_client)
    limits = Limits(rpm=3)
    start = (time.time() // 60 - 5) * 60  # a minute of the past, all of it this test's
    for _ in range(3):
        await store.submit(payload("rate"), "{}", {}, False, limits, now=start + 1)
    later = start + 60 + 24  # 0.4 of the next minute gone: the first minute weighs 0.6, 3 requests 1.8
    await store.submit(payload("rate"), "{}", {}, False, limits, now=later)  # 2.8 with this one
    try:
        await store.submit(payload("rate"), "{}", {}, False, limits, now=later)
        raise AssertionError("admitted past the rpm limit")
    except Refused as refused:
        assert refused.limit == "rpm" and refused.used == 3 and refused.used + 1 > limits.rpm
