"""The gateway under a real uvicorn server and a Redis of its own: a streaming client that leaves cancels
its job; a Redis restart gives 503s while it is down and then everything works again, SSE followers
included."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.jobs import Final, follow
from jobstore import FinalWrite, JobRef, JobStore
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobPayload, JobResult, Usage
from protocol.sampling import SamplingParams
from protocol.workers import WorkerHeartbeat
from tests.integration.fake_worker import MODEL, model_card
from tests.processes import GatewayThread, RestartableRedis

IDLE_WORKER = "test:idle-worker"


def register_idle_worker(r: redis.Redis, model_dir) -> None:
    """A live heartbeat and a model card; nothing consumes the streams."""
    card = model_card(model_dir, 2048)
    beat = WorkerHeartbeat(worker_id=IDLE_WORKER, model=MODEL, max_model_len=2048, capacity=8)
    r.hset(keys.model_card_key(MODEL), "card", card.model_dump_json())
    r.set(keys.worker_key(IDLE_WORKER), beat.model_dump_json(), ex=600)
    r.sadd(keys.WORKERS_SET, IDLE_WORKER)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


def first_job_id(response: httpx.Response) -> str:
    for line in response.iter_lines():
        if line.startswith("data: {"):
            return "job_" + json.loads(line.removeprefix("data: "))["id"].removeprefix("chatcmpl-")
    raise AssertionError("no chunk")


@pytest.mark.parametrize("run_to_completion", [False, True])
def test_streaming_client_disconnect_cancels_its_job(redis_url, default_model_dir, run_to_completion):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "run_to_completion": run_to_completion}
    with GatewayThread(redis_url) as base, httpx.Client(base_url=base, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            job_id = first_job_id(response)
        # The client closed the connection with the job still queued.
        if run_to_completion:
            time.sleep(1.0)
            assert r.hget(keys.job_key(job_id), F.STATE) == "queued"
        else:
            wait_for(lambda: r.hget(keys.job_key(job_id), F.STATE) == "cancelled")
            assert sum(r.xlen(s) for s in r.scan_iter(keys.jobs_stream(MODEL, "*", "*"))) == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_a_completion_of_several_prompts_cancels_every_job(redis_url, default_model_dir, stream):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "prompt": ["one", "two", "three"], "max_tokens": 4, "stream": stream}
    with GatewayThread(redis_url) as base, httpx.Client(base_url=base, timeout=30) as c:
        with pytest.raises(httpx.ReadTimeout):  # nothing consumes: the answer never comes
            c.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        wait_for(lambda: len(list(r.scan_iter(keys.job_keys_pattern())))  == 3)
        jobs = list(r.scan_iter(keys.job_keys_pattern()))
        wait_for(lambda: all(r.hget(job, F.STATE) == "cancelled" for job in jobs))


@pytest.mark.parametrize("stream", [True, False])
def test_a_retry_after_a_dropped_connection_runs_the_job_again(redis_url, default_model_dir, stream):
    """The Idempotency-Key's use: the connection dropped, the client retries with the same key. The drop
    cancelled the first job and freed the key, so the retry queues a job of its own (it got the cancelled
    one, a 409, for a day)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    headers = {"Idempotency-Key": "retry-me"}
    with GatewayThread(redis_url) as base, httpx.Client(base_url=base, timeout=30) as c:
        with pytest.raises(httpx.ReadTimeout):  # nothing consumes: the answer never comes
            with c.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                          timeout=httpx.Timeout(30, read=1.0)) as response:
                response.read()
        wait_for(lambda: len(list(r.scan_iter(keys.job_keys_pattern()))) == 1)
        [first] = list(r.scan_iter(keys.job_keys_pattern()))
        wait_for(lambda: r.hget(first, F.STATE) == "cancelled")
        wait_for(lambda: not list(r.scan_iter("*idem*")))
        with pytest.raises(httpx.ReadTimeout):
            with c.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                          timeout=httpx.Timeout(30, read=1.0)) as response:
                assert response.status_code == 200
                response.read()
        jobs = list(r.scan_iter(keys.job_keys_pattern()))
        assert len(jobs) == 2 and first in jobs


def _open_request(base: str, body: dict, key: str) -> socket.socket:
    """A completion sent on a raw socket and left waiting: closing the socket is the client leaving."""
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Idempotency-Key: " + key.encode() + b"\r\nContent-Length: " + str(len(payload)).encode() +
                 b"\r\n\r\n" + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_retry_that_comes_before_the_drop_is_noticed_takes_the_job_over(redis_url, default_model_dir, stream):
    """A client whose read timed out retries at once, often before the gateway notices the first connection
    closed: the retry waits on the first job, and the first connection's close must not cancel it under the
    retry (it did: the retry got the cancelled job). The last of the two to leave cancels it."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    with GatewayThread(redis_url) as base:
        first = _open_request(base, body, "retry-at-once")
        wait_for(lambda: len(list(r.scan_iter(keys.job_keys_pattern()))) == 1)
        [job] = list(r.scan_iter(keys.job_keys_pattern()))
        retry = _open_request(base, body, "retry-at-once")
        wait_for(lambda: r.hget(job, F.WAITERS) == "1")
        first.close()
        wait_for(lambda: r.hget(job, F.WAITERS) == "0")
        time.sleep(0.3)
        assert r.hget(job, F.STATE) == "queued" and list(r.scan_iter("*idem*"))
        retry.close()
        wait_for(lambda: r.hget(job, F.STATE) == "cancelled")
        assert not list(r.scan_iter("*idem*"))  # released: the next retry runs anew
        assert len(list(r.scan_iter(keys.job_keys_pattern()))) == 1


# --- Redis restarts ------------------------------------------------------------------------------------


@pytest.fixture
def restartable() -> Iterator[RestartableRedis]:
    server = RestartableRedis(Path(tempfile.mkdtemp(prefix="tokenq-redis-restart-")))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_redis_restart_503_then_recovery(restartable, default_model_dir):
    r = redis.Redis.from_url(restartable.url, decode_responses=True)
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    with GatewayThread(restartable.url) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.post("/v1/jobs", json=body).status_code == 202
        restartable.stop()
        assert _port_closed(restartable.port)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for path, sent in (("/v1/jobs", body), ("/v1/completions", body), ("/v1/chat/completions", chat)):
            resp = c.post(path, json=sent)
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "redis_unavailable"
        assert c.get("/v1/jobs/job_x").status_code == 503
        assert c.get("/readyz").status_code == 503
        restartable.start()
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        assert c.get(f"/v1/jobs/{resp.json()['id']}").json()["status"] == "queued"
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("followers", [1, 3])
async def test_follower_survives_a_redis_restart(restartable, followers):
    """One follower on a hub of its own; or three on the gateway's shared hub (one pub/sub connection)."""
    import redis.asyncio as aioredis

    from gateway.event_hub import EventHub
    from gateway.redis_client import make_redis

    client = make_redis(restartable.url)
    hub = EventHub(client) if followers > 1 else None
    payload = JobPayload(id=keys.new_job_id(MODEL, "restart"), model=MODEL, kind="completion", prompt_token_ids=[1, 2],
                         sampling=SamplingParams(max_tokens=2))
    await JobStore(client).submit(payload, "{}", {}, streamed=False)
    finals: list[Final] = []

    async def wait() -> None:
        async for item in follow(client, payload.id, want_deltas=False, hub=hub):
            if isinstance(item, Final):
                finals.append(item)
                return

    tasks = [asyncio.create_task(wait()) for _ in range(followers)]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(restartable.stop)
    await asyncio.sleep(2.0)  # longer than the client's own retries: follow must subscribe again itself
    await asyncio.to_thread(restartable.start)
    other = aioredis.from_url(restartable.url, decode_responses=True)
    assert await other.hget(keys.job_key(payload.id), F.STATE) == "queued"  # kept by the AOF
    result = JobResult(text="done", finish_reason="stop", usage=Usage(prompt_tokens=2, completion_tokens=1,
                                                                      total_tokens=3))
    await JobStore(other).write([], [FinalWrite(JobRef.of(payload), "succeeded", result.model_dump_json())])
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
    assert len(finals) == followers
    assert all(f.state == "succeeded" and f.result.text == "done" for f in finals)
    if hub is not None:
        assert hub.channels == 0
        await hub.aclose()
    await other.aclose()
    await client.aclose()


def test_redis_out_of_memory_is_503_and_not_ready(restartable, default_model_dir):
    r = redis.Redis.from_url(restartable.url, decode_responses=True)
    register_idle_worker(r, default_model_dir)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with GatewayThread(restartable.url) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")  # far below what it uses: every write is refused with OOM
        try:
            # Reads go on: a job reads as it is (a MULTI read was refused whole), an unknown one is a 404.
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            assert c.get(f"/v1/jobs/{job_id[:-4]}beef").status_code == 404
            for path, sent in (("/v1/jobs", body), ("/v1/completions", body), ("/v1/chat/completions", chat),
                               ("/v1/completions", {**body, "stream": True})):
                resp = c.post(path, json=sent)
                assert resp.status_code == 503, resp.text
                error = resp.json()["error"]
                assert error["type"] == "server_overloaded" and error["code"] == "redis_oom", error
                assert "out of memory" in error["message"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"] == "redis_oom"
        finally:
            r.config_set("maxmemory", "0")
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/jobs", json=body).status_code == 202
