"""What only a Redis Cluster shows: job events travel on shard channels (SPUBLISH to SSUBSCRIBE, one
connection a node), models' queues spread over the nodes, and what is not laid out for a cluster yet says
so instead of failing later."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.app import create_app
from gateway.event_hub import ShardedEventHub, event_hub
from jobstore import DeltaWrite, FinalWrite, JobRef, JobStore
from jobstore.connect import connect
from protocol import keys
from protocol.events import DeltaEvent, StateEvent, parse_event
from protocol.jobs import JobPayload, new_job_id
from protocol.sampling import SamplingParams
from worker.webhooks.service import WebhookService


@pytest.fixture
async def cluster(redis_cluster_url):
    client = connect(redis_cluster_url)
    await client.flushdb(target_nodes=client.PRIMARIES)
    yield client
    await client.aclose()


def job(model: str) -> JobPayload:
    return JobPayload(id=new_job_id(model), model=model, kind="completion", prompt_token_ids=[1, 2],
                      sampling=SamplingParams(max_tokens=2))


async def test_events_travel_on_shard_channels(cluster):
    store = JobStore(cluster)
    p = job("m-events")
    ref = JobRef.of(p)
    await store.submit(p, "{}", {}, streamed=True)
    await store.start([p.id], time.time(), "w")
    hub = event_hub(cluster)
    assert isinstance(hub, ShardedEventHub)
    channel = keys.events_channel(p.id)
    node = cluster.get_node_from_key(channel)
    try:
        async with hub.join(channel) as sub:
            shard_channels = await cluster.execute_command("PUBSUB SHARDCHANNELS", target_nodes=node)
            assert channel in shard_channels
            assert await cluster.execute_command("PUBSUB CHANNELS", target_nodes=cluster.PRIMARIES) == []
            delta = DeltaEvent(seq=1, offset=0, text="hi").model_dump_json()
            assert await store.write([DeltaWrite(p.id, "hi", 1, delta)], [FinalWrite(ref, "succeeded")]) == [1]
            got = [parse_event(await sub.get(5.0)), parse_event(await sub.get(5.0))]
    finally:
        await hub.aclose()
    assert isinstance(got[0], DeltaEvent) and got[0].text == "hi"
    assert isinstance(got[1], StateEvent) and got[1].state.value == "succeeded" and got[1].seq == 2


async def test_models_queues_spread_over_the_nodes(cluster):
    store = JobStore(cluster)
    nodes = set()
    for i in range(12):
        p = job(f"model-{i}")
        await store.submit(p, "{}", {}, streamed=False)
        nodes.add(cluster.get_node_from_key(JobRef.of(p).stream).name)
        assert (await store.read(p.id))["state"] == "queued"
    assert len(nodes) == 3


async def test_what_is_single_node_only_says_so(redis_cluster_url, cluster):
    app = create_app(redis_cluster_url)
    async with app.router.lifespan_context(app):
        assert not app.state.ctx.cache.available
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            for path in ("/v1/files", "/v1/batches"):
                r = await c.get(path)
                assert r.status_code == 501 and r.json()["error"]["code"] == "not_on_cluster"
    with pytest.raises(ValueError, match="arq does not support Redis Cluster"):
        await WebhookService(redis_cluster_url).run(asyncio.Event())


async def test_workers_on_every_node_are_listed(cluster):
    """Heartbeats lie in many slots: reading them all is one MGET per slot."""
    from gateway.registry import Registry
    from protocol.workers import WorkerHeartbeat

    ids = [f"host-{i}:1" for i in range(8)]
    assert len({cluster.get_node_from_key(keys.worker_key(i)).name for i in ids}) > 1
    for i in ids:
        beat = WorkerHeartbeat(worker_id=i, model="m", max_model_len=64, capacity=1)
        await cluster.set(keys.worker_key(i), beat.model_dump_json(), ex=60)
        await cluster.sadd(keys.WORKERS_SET, i)
    assert sorted(w.worker_id for w in await Registry(cluster).live_workers()) == ids


async def test_api_keys_work_on_a_cluster(redis_cluster_url, cluster):
    from gateway.apikeys import create_key, revoke_key

    created = await create_key(cluster, "acme", {"rpm": 5})
    app = create_app(redis_cluster_url)
    async with app.router.lifespan_context(app):
        app.state.ctx.auth.cache_s = app.state.ctx.auth.stale_s = 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            assert (await c.get("/v1/models")).status_code == 401
            ok = await c.get("/v1/models", headers={"authorization": f"Bearer {created.api_key}"})
            assert ok.status_code == 200
            assert await revoke_key(cluster, created.api_key) == [created.digest]
            gone = await c.get("/v1/models", headers={"authorization": f"Bearer {created.api_key}"})
            assert gone.status_code == 401


async def test_webhooks_are_delivered_with_arq_on_a_single_node(redis_cluster_url, cluster, single_redis_url):
    """The job store on the cluster (outboxes, jobs, attempts), arq's queue on a single-node Redis."""
    import redis.asyncio as aioredis

    from protocol.webhook_secret import FIELD as SECRET_FIELD
    from protocol.webhook_secret import new_secret
    from tests.integration.test_webhooks import (
        ALLOW,
        FAST,
        TENANT,
        Receiver,
        attempts_when_done,
        finish,
        new_job,
    )

    queue = aioredis.from_url(single_redis_url)
    await queue.flushdb()
    await queue.aclose()
    secret = new_secret()
    await cluster.hset(keys.tenant_key(TENANT), SECRET_FIELD, secret)
    service = WebhookService(redis_cluster_url, policy=FAST, allow=ALLOW, poll_delay=0.05, block_ms=100,
                             queue_url=single_redis_url)
    stop = asyncio.Event()
    with Receiver(secret, lambda path, n: (200, {})) as rx:
        task = asyncio.create_task(service.run(stop))
        try:
            jobs = [await new_job(cluster, rx.url("/hook")) for _ in range(2)]
            for job_id in jobs:
                await finish(cluster, job_id)
            runs = [await attempts_when_done(cluster, job_id) for job_id in jobs]
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    assert [[a["outcome"] for a in run] for run in runs] == [["delivered"], ["delivered"]]
    assert sorted(a["event"]["data"]["id"] for a in rx.accepted) == sorted(jobs)
    outbox = keys.webhook_outbox("fake-model")
    assert await cluster.xlen(outbox) == 0
