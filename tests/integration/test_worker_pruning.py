"""Queue housekeeping against a real Redis: empty tenant streams leave their lane after the idle time,
consumers of dead workers leave the group, and a pruned tenant that comes back is read again."""

from __future__ import annotations

import asyncio

from protocol import keys
from protocol.jobs import JobPayload, new_job_id
from protocol.sampling import SamplingParams
from tests.fakes import started_intake, submit_job
from worker.pruning import Pruner

MODEL = "prune-model"
LANE_SET = keys.lane_tenants_key(MODEL, "default")


def payload(tenant: str) -> JobPayload:
    return JobPayload(id=new_job_id(MODEL), model=MODEL, kind="chat", prompt_token_ids=[1, 2], tenant=tenant,
                      sampling=SamplingParams(max_tokens=2))


def stream(tenant: str) -> str:
    return keys.jobs_stream(MODEL, "default", tenant)


async def _take(r, tenant: str, consumer: str, ack: bool = True) -> None:
    """Read the tenant's entry as `consumer`; with ack, acknowledge and delete it as a worker does."""
    if not any(g["name"] == keys.GROUP for g in await r.xinfo_groups(stream(tenant))):
        await r.xgroup_create(stream(tenant), keys.GROUP, id="0")
    [[_, [(entry_id, _)]]] = await r.xreadgroup(keys.GROUP, consumer, {stream(tenant): ">"}, count=1)
    if ack:
        await r.xack(stream(tenant), keys.GROUP, entry_id)
        await r.xdel(stream(tenant), entry_id)


async def test_empty_streams_go_after_their_idle_time(redis_client):
    r = redis_client
    for tenant in ("busy", "gone"):
        await submit_job(r, payload(tenant))
    await _take(r, "gone", "w:1")
    pruner = Pruner(r, MODEL, stream_idle_s=0.5)
    assert (await pruner.prune())[0] == 0  # "gone" is empty, but its last entry is too recent
    await asyncio.sleep(0.6)
    assert (await pruner.prune())[0] == 1
    assert await r.smembers(LANE_SET) == {"busy"}
    assert not await r.exists(stream("gone")) and await r.xlen(stream("busy")) == 1


async def test_dead_consumers_without_pending_entries_go(redis_client):
    r = redis_client
    for _ in range(3):
        await submit_job(r, payload("t"))
    await r.sadd(keys.WORKERS_SET, "live:1", "dead:1", "dead:2")
    await r.set(keys.worker_key("live:1"), "{}", ex=30)  # only live:1 has a heartbeat
    await _take(r, "t", "live:1")
    await _take(r, "t", "dead:1")
    await _take(r, "t", "dead:2", ack=False)  # pending: recovery's to claim first
    assert await Pruner(r, MODEL).prune() == (0, 1)
    names = {c["name"] for c in await r.xinfo_consumers(stream("t"), keys.GROUP)}
    assert names == {"live:1", "dead:2"}


async def test_a_pruned_tenant_that_comes_back_is_read(redis_client):
    r = redis_client
    await submit_job(r, payload("back"))
    pruner = Pruner(r, MODEL, every_s=0.0, stream_idle_s=0.0)
    async with started_intake(r, MODEL, consumer="w:1", pruner=pruner) as (intake, pub, _):
        assert await intake.poll() == 1
        for _ in range(100):  # the fake engine finishes it; the publisher acknowledges and deletes it
            await pub.publish(await asyncio.wait_for(intake.engine_loop.outputs.get(), 5))
            if not pub.busy:
                break
        assert await r.xlen(stream("back")) == 0
        await intake.poll()  # the pass that prunes the empty stream, then waits for entries
        assert not await r.exists(stream("back")) and not await r.smembers(LANE_SET)
        again = payload("back")
        await submit_job(r, again)  # XADD makes the stream anew, without the group
        read = 0
        for _ in range(5):
            try:
                read += await intake.poll()
            except Exception as e:  # what intake.run() would see: NOGROUP, then it re-creates the group
                assert "NOGROUP" in str(e)
                intake.streams.reset()
            if read:
                break
        assert read == 1 and again.id in pub.jobs
