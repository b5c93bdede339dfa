"""Non-streaming completions waiting for their jobs, against a real uvicorn gateway and a real Redis: every
waiter of a gateway process shares one pub/sub connection (hundreds of waiting requests are not hundreds
of Redis clients), and a client that disconnects cancels its job, as a streaming one does."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from protocol import job_record as F
from protocol import keys
from tests.integration.fake_worker import MODEL
from tests.integration.test_gateway_resilience import register_idle_worker
from tests.processes import GatewayThread

WAITERS = 300


def clients(r: redis.Redis) -> int:
    return int(r.info("clients")["connected_clients"])


async def until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def job_states(r: redis.Redis) -> dict[str, str]:
    ids = [k.split(":job:", 1)[1] for k in r.scan_iter(keys.job_keys_pattern(), count=1000)]
    ids = [i for i in ids if ":" not in i]
    return {i: r.hget(keys.job_key(i), F.STATE) for i in ids}


async def test_waiters_share_one_connection_and_a_disconnect_cancels(redis_url, default_model_dir):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    register_idle_worker(r, default_model_dir)  # alive, takes nothing: every job stays queued
    before = clients(r)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    gateway = GatewayThread(redis_url)
    with gateway as base:
        def subscribed() -> int:
            return len(r.pubsub_channels(keys.events_pattern("*")))

        limits = httpx.Limits(max_connections=WAITERS + 10)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            kept = asyncio.create_task(c.post("/v1/completions", json={**body, "run_to_completion": True}))
            waiting = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(WAITERS)]
            await until(lambda: subscribed() == WAITERS + 1, 120, "every request to wait on its job")
            during = clients(r) - before
            assert during < 20, f"{during} Redis clients for {WAITERS + 1} waiting requests"
            print(f"Redis clients while {WAITERS + 1} requests wait: {during} more than before")
            assert not any(t.done() for t in [kept, *waiting])
            for task in [kept, *waiting]:
                task.cancel()
            await asyncio.gather(kept, *waiting, return_exceptions=True)
        # The clients are gone: their jobs end cancelled, except the one that asked to run to completion.
        await until(lambda: sum(s == "cancelled" for s in job_states(r).values()) == WAITERS, 60,
                    "the abandoned jobs to be cancelled")
        states = job_states(r)
        assert sorted(set(states.values())) == ["cancelled", "queued"]
        assert list(states.values()).count("queued") == 1
        await until(lambda: subscribed() == 0, 30, "every channel to be dropped")
        assert clients(r) - before < 20
