"""The webhook deliverer under a full Redis (maxmemory reached, noeviction: every write refused, reads
served): it waits with back-off, says so once per loop, and delivers what came due once memory is freed."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from arq import Retry
from structlog.testing import capture_logs

from protocol import job_record as F
from protocol import keys
from tests.integration.test_webhooks import (
    ALLOW,
    FAST,
    Receiver,
    attempts_when_done,
    finish,
    flaky,
    new_job,
    secret,
    service,
)
from worker.webhooks.delivery import CTX_KEY, Deliverer, deliver_webhook, new_http_client
from worker.webhooks.relay import GROUP, Relay, arq_job_id
from worker.webhooks.service import QUEUE, arq_pool

__all__ = ["secret"]  # the fixture, imported for the tests here
OOM_LINE = "redis is out of memory and refuses writes; retrying with back-off (raise its maxmemory or free memory)"


@contextlib.asynccontextmanager
async def redis_full(redis):
    """Redis refuses every write until the block ends (the probe's recipe: maxmemory far below its use)."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        yield
    finally:
        await redis.config_set("maxmemory", "0")


async def test_a_deliverer_started_on_a_full_redis_waits_and_delivers_once_memory_is_freed(
        redis_url, redis_client, secret) -> None:
    """It crashed at its start (arq's health record, the relay's group creation) and, under `tokenq up`,
    crash-looped."""
    with Receiver(secret, flaky) as rx, capture_logs() as logs:
        job = await new_job(redis_client, rx.url("/ok"))
        await finish(redis_client, job)  # on the outbox before Redis filled up: due while it is full
        async with service(redis_url):
            async with redis_full(redis_client):
                await asyncio.sleep(2.0)  # rounds of both loops, each refused
                assert not rx.requests
            attempts = await attempts_when_done(redis_client, job)
    assert [(a["outcome"], a["status"]) for a in attempts] == [("delivered", 200)]
    assert len(rx.accepted) == 1
    said = [(e["event"], e.get("loop")) for e in logs if e.get("loop") in ("webhook relay", "webhook delivery")]
    for loop in ("webhook relay", "webhook delivery"):  # once each, however many retries
        assert said.count((OOM_LINE, loop)) == 1, said
        assert ("redis accepts writes again", loop) in said, said


async def test_an_entry_read_while_redis_is_full_is_relayed_once_memory_is_freed(redis_url, redis_client) -> None:
    """Reading an outbox is no write, so a full Redis hands the relay its entry and refuses the enqueue; the
    entry, pending on the relay, waited for the claim-back after CLAIM_IDLE_MS (or was lost with the relay)."""
    pool = await arq_pool(redis_url)
    relay = Relay(redis_client, pool, FAST, QUEUE, block_ms=100)
    job = await new_job(redis_client, "http://127.0.0.1:9/hook")
    await relay.run_once()  # the groups made; nothing to relay yet
    await finish(redis_client, job)
    outbox = keys.webhook_outbox("fake-model")
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async with redis_full(redis_client):
            deadline = time.monotonic() + 5
            while not (await redis_client.xpending(outbox, GROUP))["pending"]:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # rounds whose enqueue is refused
            assert not task.done() and await redis_client.zscore(QUEUE, arq_job_id(job)) is None
        deadline = time.monotonic() + 5  # well within CLAIM_IDLE_MS
        while await redis_client.zscore(QUEUE, arq_job_id(job)) is None:
            assert time.monotonic() < deadline and not task.done(), task
            await asyncio.sleep(0.05)
        assert (await redis_client.xpending(outbox, GROUP))["pending"] == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.aclose()


async def test_an_attempt_whose_write_is_refused_is_tried_again_not_failed(redis_client, secret) -> None:
    """Its first write (the tenant's secret, made on first use) raised OutOfMemoryError out of the attempt:
    arq took it as a failed job, which it drops once it can write again."""
    job = await new_job(redis_client, "http://127.0.0.1:9/hook")
    await finish(redis_client, job)
    deliverer = Deliverer(redis_client, new_http_client(), FAST, ALLOW)
    try:
        async with redis_full(redis_client):
            with pytest.raises(Retry):
                await deliver_webhook({CTX_KEY: deliverer}, job)
    finally:
        await deliverer.http.aclose()
    assert F.webhook_attempts(await redis_client.hgetall(keys.job_key(job))) == []
