"""jobstore/pipe.py against a real Redis: replies matched to their commands under concurrency, scripts
reloaded after NOSCRIPT, a killed connection replaced, Redis away as redis-py's ConnectionError, and the
submission scripts safe to run twice (what a retry after a lost reply does)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.redis_client import CONNECT_TIMEOUT_S, RETRIES
from jobstore import IdempotencyKey, JobStore, Limits
from jobstore.pipe import RedisPipe
from jobstore.scripts import Script
from protocol import keys
from protocol.jobs import JobPayload
from protocol.sampling import SamplingParams
from tests.conftest import free_port


@pytest.fixture
async def pipe(redis_url, redis_client):
    client = aioredis.from_url(redis_url, decode_responses=True)
    p = RedisPipe(client, RETRIES, CONNECT_TIMEOUT_S)
    yield p
    await p.aclose()
    await client.aclose()


async def test_concurrent_commands_get_their_own_replies(pipe, redis_client):
    replies = await asyncio.gather(*(pipe.execute("ECHO", f"m{i}") for i in range(200)),
                                   *(pipe.execute("INCR", "n") for _ in range(50)))
    assert replies[:200] == [f"m{i}" for i in range(200)]
    assert sorted(replies[200:]) == list(range(1, 51))
    with pytest.raises(ResponseError):
        await pipe.execute("HSET", "n", "f", "v")  # wrong type: an error reply, the connection stays up
    assert await pipe.execute("GET", "n") == "50"


async def test_script_is_sent_again_after_noscript(pipe, redis_client):
    script = Script("return ARGV[1] .. KEYS[1]")
    assert await pipe.evalsha(script, ["k"], ["a"]) == "ak"
    await redis_client.script_flush()
    assert await pipe.evalsha(script, ["k"], ["b"]) == "bk"
    assert await redis_client.script_exists(script.sha) == [True]


async def test_other_connection_kinds_go_through_redis_py(redis_url, redis_client):
    """A connection class this does not speak (TLS, Unix sockets): the commands go to the redis-py client."""

    class Other(Connection):
        pass

    client = aioredis.Redis(connection_pool=ConnectionPool.from_url(redis_url, connection_class=Other,
                                                                    decode_responses=True))
    p = RedisPipe(client, RETRIES, CONNECT_TIMEOUT_S)
    script = Script("return 'via ' .. ARGV[1]")
    assert await p.evalsha(script, [], ["redis-py"]) == "via redis-py"
    await redis_client.script_flush()
    assert await p.evalsha(script, [], ["redis-py"]) == "via redis-py"
    assert p._proto is None  # no connection of its own
    await client.aclose()


async def test_killed_connection_is_replaced(pipe, redis_client):
    assert await pipe.execute("PING") == "PONG"
    first = pipe._proto
    host, port = first.transport.get_extra_info("sockname")[:2]
    assert await redis_client.client_kill(f"{host}:{port}")
    assert await pipe.execute("PING") == "PONG"
    assert pipe._proto is not first and first.lost is not None


async def test_selects_the_urls_database(redis_url, redis_client):
    client = aioredis.from_url(redis_url.rsplit("/", 1)[0] + "/3", decode_responses=True)
    p = RedisPipe(client, RETRIES, CONNECT_TIMEOUT_S)
    await p.execute("SET", "in-db-3", "yes")
    assert await redis_client.get("in-db-3") is None
    assert await client.get("in-db-3") == "yes"
    await client.delete("in-db-3")
    await p.aclose()
    await client.aclose()


async def test_redis_away_is_a_connection_error_after_the_retries():
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    p = RedisPipe(client, RETRIES, CONNECT_TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await p.execute("PING")
    assert time.monotonic() - start > 0.5  # it backed off and tried again first
    await client.aclose()


async def test_submit_twice_queues_once(pipe, redis_client):
    payload = JobPayload(id=keys.new_job_id("m", "twice"), model="m", kind="completion", prompt_token_ids=[1, 2],
                         sampling=SamplingParams(max_tokens=2))
    store = JobStore(redis_client, scripts=pipe)
    await store.submit(payload, '{"prompt": [1, 2]}', {}, streamed=False)
    await store.submit(payload, '{"prompt": [1, 2]}', {}, streamed=False)
    stream = keys.jobs_stream("m", payload.lane, payload.tenant)
    [(entry_id, _)] = await redis_client.xrange(stream)
    assert await redis_client.get(keys.tenant_queued_key(payload.tenant, "m")) == "1"
    assert await redis_client.hget(keys.job_key(payload.id), "entry_id") == entry_id


async def test_admission_retried_for_the_same_job_admits_it(pipe, redis_client):
    store = JobStore(redis_client, scripts=pipe)

    def job(job_id: str) -> JobPayload:
        return JobPayload(id=job_id, model="m", kind="completion", prompt_token_ids=[1], tenant="t",
                          sampling=SamplingParams(max_tokens=1))

    limits = Limits(rpm=100)
    a, b = keys.new_job_id("m", "a"), keys.new_job_id("m", "b")
    key = IdempotencyKey("key-1", "digest")
    first = await store.submit(job(a), "{}", {}, False, limits, key)
    again = await store.submit(job(a), "{}", {}, False, limits, key)  # its own key: a retry
    other = await store.submit(job(b), "{}", {}, False, limits, key)  # another request: a repeat
    assert (first.job_id, first.repeat) == (a, False)
    assert (again.job_id, again.repeat) == (a, False)
    assert (other.job_id, other.repeat) == (a, True)
    assert await redis_client.xlen(keys.jobs_stream("m", "default", "t")) == 1


@pytest.mark.parametrize("password", ["wrong", None])
async def test_a_refused_password_is_an_authentication_error(guarded_redis, password):
    """As redis-py raises it, so that a role's log names the password (protocol/outage.py) rather than calling
    a Redis that answers unreachable."""
    client = aioredis.Redis(port=guarded_redis, password=password)
    p = RedisPipe(client, 1, CONNECT_TIMEOUT_S)
    with pytest.raises(AuthenticationError, match="AUTH" if password else "NOAUTH"):
        await p.execute("PING")
    await p.aclose()
    await client.aclose()
    right = aioredis.Redis(port=guarded_redis, password="right")
    p = RedisPipe(right, 1, CONNECT_TIMEOUT_S)
    assert await p.execute("PING") in ("PONG", b"PONG")
    await p.aclose()
    await right.aclose()
