"""The submitting routes through gateway/fastpath.py answer as their FastAPI routes do. Each scenario runs
twice on a fresh Redis: once with the fast path switched off (the FastAPI routes alone) and once with it, and
the answers must match (status, headers, JSON or the SSE events). A spy on the fast path's hand-over to
FastAPI shows which requests it answered itself: everything but the bodies that do not validate."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx

from gateway.apikeys import create_key
from gateway.app import create_app
from protocol import job_record as F
from protocol import keys
from protocol.workers import WorkerHeartbeat
from tests.fakes import lane_streams
from tests.integration.fake_worker import MODEL, FakeWorker, model_card

WORKER = "test:fastpath-worker"
PROMPT = {"model": MODEL, "prompt": "one two three", "max_tokens": 8}
HEADERS = ("content-type", "retry-after", "idempotent-replayed", "www-authenticate")

Scenario = Callable[[httpx.AsyncClient, object], Awaitable[list[httpx.Response]]]


async def register_worker(redis_client, model_dir, alive: bool = True) -> None:
    card = model_card(model_dir, 2048)
    await redis_client.hset(keys.model_card_key(MODEL), "card", card.model_dump_json())
    if alive:
        beat = WorkerHeartbeat(worker_id=WORKER, model=MODEL, max_model_len=2048, capacity=8)
        await redis_client.set(keys.worker_key(WORKER), beat.model_dump_json(), ex=600)
        await redis_client.sadd(keys.WORKERS_SET, WORKER)


def _masked(obj: dict) -> dict:
    return {**obj, **{k: f"<{k}>" for k in ("id", "created", "created_at") if k in obj}}


def shape(r: httpx.Response) -> dict:
    """What must be equal between the two paths: volatile values (new ids, times) masked."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
        body = [e if e == "[DONE]" else _masked(json.loads(e)) for e in events]
        return {"status": r.status_code, "headers": {h: r.headers.get(h) for h in HEADERS}, "body": body}
    body = r.json()
    if r.status_code in (200, 202):
        body = _masked(body)
    elif r.status_code == 429:  # the wait is computed from the clock, a second apart at most
        body = {"error": {**body["error"], "message": re.sub(r"\d+s$", "<n>s", body["error"]["message"])}}
    headers = {h: r.headers.get(h) for h in HEADERS if h != "retry-after" or r.status_code != 429}
    return {"status": r.status_code, "headers": headers, "body": body}


@asynccontextmanager
async def gateway(redis_url, redis_client, model_dir, fast: bool, alive: bool = True, working: bool = False,
                  **app_options) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """A fresh Redis and app, with or without the fast path (and with a fake worker that runs the jobs
    when `working`); the list collects the paths of the requests the fast path passed on to FastAPI."""
    await redis_client.flushdb()
    await register_worker(redis_client, model_dir, alive)
    async with _working(redis_url, model_dir, working):
        async with _app(redis_url, fast, app_options) as (client, passed_on):
            yield client, passed_on


@asynccontextmanager
async def _working(redis_url, model_dir, working: bool) -> AsyncIterator[None]:
    if not working:
        yield
        return
    worker = FakeWorker(redis_url, model_dir, step_s=0.001)
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()


@asynccontextmanager
async def _app(redis_url, fast: bool, app_options: dict) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    app = create_app(redis_url, **app_options)
    passed_on: list[str] = []
    if fast:
        fallback = app.fast_submit.fallback

        async def spy(scope, receive, send) -> None:
            passed_on.append(scope["path"])
            await fallback(scope, receive, send)

        app.fast_submit.fallback = spy
    else:
        app.fast_submit = None
    async with app.router.lifespan_context(app):
        app.state.ctx.auth.cache_s = app.state.ctx.auth.stale_s = 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                     timeout=30) as client:
            yield client, passed_on


async def both(redis_url, redis_client, model_dir, scenario: Scenario, alive: bool = True, working: bool = False,
               **app_options) -> tuple[list[httpx.Response], int]:
    """The scenario's answers with the fast path (checked equal to the FastAPI route's) and how many of its
    requests the fast path passed on to FastAPI."""
    async with gateway(redis_url, redis_client, model_dir, False, alive, working, **app_options) as (client, _):
        route = await scenario(client, redis_client)
    async with gateway(redis_url, redis_client, model_dir, True, alive, working,
                       **app_options) as (client, passed_on):
        fast = await scenario(client, redis_client)
    assert [shape(r) for r in fast] == [shape(r) for r in route]
    return fast, len(passed_on)


async def test_accepted_job_body_and_record(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        return [await c.post("/v1/jobs", json={**PROMPT, "metadata": {"k": "v"}, "priority": "batch"})]

    (answer,), passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 0
    assert answer.status_code == 202 and "idempotent-replayed" not in answer.headers
    body = answer.json()
    assert set(body) == {"id", "object", "status", "model", "kind", "priority", "created_at", "metadata",
                         "prompt_tokens"}
    assert (body["object"], body["status"], body["kind"], body["priority"], body["metadata"]) == (
        "job", "queued", "completion", "batch", {"k": "v"})
    # One script wrote the entry, the hash (with the entry's id), the queued count and the lane's tenant.
    [stream] = await lane_streams(redis_client, MODEL, "batch")
    [(entry_id, fields)] = await redis_client.xrange(stream)
    record = await redis_client.hgetall(keys.job_key(body["id"]))
    assert fields["job_id"] == body["id"] and fields["payload"] == record[F.PAYLOAD]
    assert record[F.ENTRY_ID] == entry_id and record[F.STATE] == "queued"
    assert json.loads(record[F.REQUEST]) == {**PROMPT, "metadata": {"k": "v"}, "priority": "batch"}
    assert await redis_client.get(keys.tenant_queued_key("default", MODEL)) == "1"


async def test_bad_bodies_are_400s_naming_the_field(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        return [
            await c.post("/v1/jobs", json={**PROMPT, "max_tokens": "many"}),  # pydantic: passed on
            await c.post("/v1/jobs", json={"model": MODEL}),  # neither prompt nor messages: passed on
            await c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
            await c.post("/v1/jobs", content=json.dumps(PROMPT), headers={"content-type": "text/plain"}),
            await c.post("/v1/jobs", json={**PROMPT, "temperature": 9}),  # sampling bounds: the fast path's own
            await c.post("/v1/jobs", json={**PROMPT, "ttl": -1}),
            await c.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": "x" * 300}),
            await c.post("/v1/jobs", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"}),
            await c.post("/v1/jobs", content=b'{"metadata": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                         headers={"content-type": "application/json"}),
            await c.post("/v1/jobs", content=b"", headers={"content-type": "application/json"}),
        ]

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 7
    assert [a.status_code for a in answers] == [400] * 10
    params = [a.json()["error"]["param"] for a in answers]
    assert params[:2] == ["max_tokens", "messages"] and params[4:7] == ["temperature", "ttl", "Idempotency-Key"]
    assert "not valid JSON" in answers[2].json()["error"]["message"]
    for a in answers[7:9]:  # not UTF-8; nested past the parser's depth (FastAPI said "an error parsing the body")
        assert a.json()["error"]["message"].startswith("request body is not valid JSON: it is not UTF-8 text, or")
    assert answers[9].json()["error"]["message"].startswith("request body is missing")


async def test_unauthorized_401(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        await create_key(r, "acme", {})
        return [await c.post("/v1/jobs", json=PROMPT),
                await c.post("/v1/jobs", json=PROMPT, headers={"Authorization": "Bearer tq_wrong"}),
                await c.post("/v1/jobs", json={"model": MODEL})]  # no key beats a bad body, as in FastAPI

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 1
    for a in answers:
        assert a.status_code == 401 and a.headers["www-authenticate"] == "Bearer"
        assert a.json()["error"]["code"] == "invalid_api_key"


async def test_body_too_large_413(redis_url, redis_client, default_model_dir):
    big = {**PROMPT, "prompt": "word " * 100}

    async def chunks():
        yield json.dumps(big).encode()

    async def scenario(c, r):
        return [await c.post("/v1/jobs", json=big),  # declared by Content-Length
                await c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}),
                await c.post("/v1/jobs", json=PROMPT)]

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario, max_body_bytes=200)
    assert passed_on == 0
    assert [a.status_code for a in answers] == [413, 413, 202]
    assert answers[0].json()["error"]["code"] == "request_too_large"
    assert "limit is 200 bytes" in answers[1].json()["error"]["message"]


async def test_rate_limit_429_with_retry_after(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        key = (await create_key(r, "acme", {"rpm": 1})).api_key
        auth = {"Authorization": f"Bearer {key}"}
        return [await c.post("/v1/jobs", json=PROMPT, headers=auth),
                await c.post("/v1/jobs", json=PROMPT, headers=auth)]

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 0
    assert [a.status_code for a in answers] == [202, 429]
    assert int(answers[1].headers["retry-after"]) >= 1
    assert answers[1].json()["error"]["code"] == "rate_limit_exceeded"


async def test_idempotent_repeat(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        headers = {"Idempotency-Key": "order-1"}
        return [await c.post("/v1/jobs", json={**PROMPT, "metadata": {"n": "1"}}, headers=headers),
                await c.post("/v1/jobs", json={"metadata": {"n": "1"}, **PROMPT}, headers=headers)]

    (first, again), passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 0
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert sum([await redis_client.xlen(s) for s in await lane_streams(redis_client, MODEL, "default")]) == 1


async def test_unknown_model_404_and_known_model_queued_without_worker(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        return [await c.post("/v1/jobs", json={**PROMPT, "model": "no-such-model"}),
                await c.post("/v1/jobs", json=PROMPT)]

    (unknown, dead), passed_on = await both(redis_url, redis_client, default_model_dir, scenario, alive=False)
    assert passed_on == 0
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.json()["error"]["param"] == "model"
    assert dead.status_code == 202 and dead.json()["status"] == "queued"


async def test_fast_path_is_counted_in_metrics_and_documented(redis_url, redis_client, default_model_dir):
    counts = []
    for fast in (False, True):
        async with gateway(redis_url, redis_client, default_model_dir, fast) as (c, passed_on):
            for body in (PROMPT, PROMPT, {**PROMPT, "model": "no-such-model"}):
                await c.post("/v1/jobs", json=body)
            text = (await c.get("/metrics")).text
            assert "post" in (await c.get("/openapi.json")).json()["paths"]["/v1/jobs"]
        counts.append(sorted(line for line in text.splitlines()
                             if line.startswith(("tokenq_gateway_requests_total", "tokenq_gateway_request_seconds_count",
                                                 "tokenq_gateway_jobs_enqueued_total"))))
    assert passed_on == []
    assert counts[1] == counts[0]
    assert 'tokenq_gateway_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in counts[1]
    assert 'tokenq_gateway_requests_total{method="POST",route="/v1/jobs",status="404"} 1.0' in counts[1]
    assert 'tokenq_gateway_request_seconds_count{method="POST",route="/v1/jobs"} 3.0' in counts[1]


async def test_concurrent_submissions_all_land(redis_url, redis_client, default_model_dir):
    """Many submissions in flight share the pipelined connection; each gets its own job and entry."""
    concurrency = 16

    async def scenario(c, r):
        return list(await asyncio.gather(*(c.post("/v1/jobs", json=PROMPT) for _ in range(concurrency))))
    answers, _ = await both(redis_url, redis_client, default_model_dir, scenario)
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == concurrency
    [stream] = await lane_streams(redis_client, MODEL, "default")
    entries = await redis_client.xrange(stream)
    assert {fields["job_id"] for _, fields in entries} == ids
    for entry_id, fields in entries:
        assert await redis_client.hget(keys.job_key(fields["job_id"]), F.ENTRY_ID) == entry_id


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


async def test_openai_routes_stream_and_answer_as_fastapi(redis_url, redis_client, default_model_dir):
    """Completions and chat, streamed (SSE) and whole, run by a worker: the same events and bodies."""
    async def scenario(c, r):
        return [await c.post("/v1/completions", json=PROMPT),
                await c.post("/v1/completions", json={**PROMPT, "stream": True,
                                                      "stream_options": {"include_usage": True}}),
                await c.post("/v1/chat/completions", json=CHAT),
                await c.post("/v1/chat/completions", json={**CHAT, "stream": True})]

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario, working=True)
    assert passed_on == 0
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[0].json()["choices"][0]["text"] == "one two three "
    assert answers[2].json()["choices"][0]["message"]["role"] == "assistant"
    streamed = shape(answers[1])["body"]
    assert streamed[-1] == "[DONE]" and streamed[-2]["usage"]["completion_tokens"] == 3
    assert "".join(e["choices"][0]["text"] for e in streamed[:-2]) == "one two three "
    assert shape(answers[3])["body"][0]["choices"][0]["delta"]["role"] == "assistant"


async def test_openai_routes_errors_as_fastapi(redis_url, redis_client, default_model_dir):
    async def scenario(c, r):
        answers = [await c.post("/v1/completions", json={**PROMPT, "temperature": 9}),  # the fast path's own
                   await c.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"}),
                   await c.post("/v1/completions", json={**PROMPT, "max_tokens": "many"}),  # passed on
                   await c.post("/v1/chat/completions", json={**CHAT, "messages": "hi"}),  # passed on
                   await c.post("/v1/completions", json=PROMPT, headers={"Idempotency-Key": "x" * 300})]
        await create_key(r, "acme", {})
        return [*answers, await c.post("/v1/chat/completions", json={**CHAT, "stream": True})]

    answers, passed_on = await both(redis_url, redis_client, default_model_dir, scenario)
    assert passed_on == 2
    assert [a.status_code for a in answers] == [400, 404, 400, 400, 400, 401]
    assert [a.json()["error"]["param"] for a in answers[:5]] == ["temperature", "model", "max_tokens", "messages",
                                                                  "Idempotency-Key"]
