"""The gateway against a real Redis and the fake worker, through httpx's ASGI transport: each test on one
redis-server and on a three-node cluster (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from gateway.app import create_app
from jobstore import JobRef
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobPayload
from tests.asserts import assert_error
from tests.fakes import lane_streams
from tests.integration.fake_worker import MODEL, FakeWorker
from tests.integration.test_gateway_tenants import IDLE_WORKER, PROMPT, idle_worker_again

# Every test here runs on one redis-server and on a three-node cluster (tests/conftest.py).
pytestmark = pytest.mark.both_redis


@pytest.fixture
async def app(redis_url, redis_client):
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                 timeout=30) as c:
        yield c


@pytest.fixture
async def worker(redis_url, redis_client, default_model_dir):
    w = FakeWorker(redis_url, default_model_dir)
    await w.start()
    yield w
    await w.stop()


async def stream_lengths(redis_client) -> dict[str, int]:
    return {lane: sum([await redis_client.xlen(s) for s in await lane_streams(redis_client, MODEL, lane)])
            for lane in keys.LANES}


async def test_chat_completion(client, worker):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "red green blue"}], "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "red green blue" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 3 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_completion_text_and_token_ids(client, worker):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "one two three four",
                                                   "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "one two "
    assert body["choices"][0]["finish_reason"] == "length"

    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2]], "max_tokens": 3})
    assert r.status_code == 200, r.text


async def test_completion_echo(client, worker):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "alpha beta", "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "alpha beta" + "alpha beta "


async def test_chat_stream_sse(client, worker):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "a b c d e"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n\n") if ln.strip() and not ln.startswith(":")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    job_id = "job_" + chunks[0]["id"].removeprefix("chatcmpl-")
    record = await worker.redis.hgetall(keys.job_key(job_id))
    assert record["streamed"] == "1"
    assert text == json.loads(record["result"])["text"]
    assert "a b c d e" in text


async def test_job_lifecycle(client, worker, redis_client):
    r = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "x y z", "metadata": {"k": "v"},
                                            "priority": "batch"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "job" and job["status"] == "queued" and job["id"].startswith("job_")
    assert isinstance(job["created_at"], int)
    for _ in range(200):
        r = await client.get(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200
        if r.json()["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    got = r.json()
    assert got["status"] == "succeeded"
    assert got["metadata"] == {"k": "v"} and got["model"] == MODEL and got["priority"] == "batch"
    assert got["started_at"] is not None and got["finished_at"] is not None
    assert got["result"]["object"] == "text_completion"
    assert got["result"]["choices"][0]["text"] == "x y z "
    assert got["error"] is None
    # Never streamed: the worker published no deltas, so the hash's streamed flag stayed 0.
    assert await redis_client.hget(keys.job_key(job["id"]), "streamed") == "0"


async def test_job_failed(client, worker):
    r = await client.post("/v1/jobs", json={"model": MODEL, "messages": [{"role": "user", "content": "FAIL_ME"}]})
    assert r.status_code == 202
    job_id = r.json()["id"]
    for _ in range(200):
        got = (await client.get(f"/v1/jobs/{job_id}")).json()
        if got["status"] == "failed":
            break
        await asyncio.sleep(0.02)
    assert got["status"] == "failed" and got["error"]["type"] == "engine_error" and got["result"] is None
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "FAIL_ME"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == r.json()["error"]["code"] == "engine_error"
    r = await client.post("/v1/chat/completions", json={  # a constraint the engine could not compile, say
        "model": MODEL, "messages": [{"role": "user", "content": "REFUSE_ME"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_job_404(client):
    r = await client.get("/v1/jobs/job_nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = await client.get("/v1/jobs/job_nope/events")
    assert r.status_code == 404


async def test_a_route_tokenq_lacks_is_named_in_the_error(client):
    """An OpenAI client calling an endpoint tokenq does not serve reads which one, not a bare "Not Found"."""
    r = await client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "no such route: POST /v1/embeddings (GET /docs lists tokenq's routes)"
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "method not allowed: GET /v1/chat/completions (allowed: POST)"


async def test_models_and_readiness(client, redis_client, redis_url, default_model_dir):
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["workers"] == 0  # a gateway is ready without workers
    assert (await client.get("/v1/models")).json() == {"object": "list", "data": []}
    assert (await client.get("/healthz")).status_code == 200
    for path in ("/healthz", "/readyz", "/v1/models"):  # health checkers that send HEAD see it up
        r = await client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    w = FakeWorker(redis_url, default_model_dir)
    await w.start()
    try:
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert models["data"][0]["object"] == "model"
    finally:
        await w.stop()
    assert (await client.get("/readyz")).status_code == 200
    models = (await client.get("/v1/models")).json()["data"]
    assert [(m["id"], m["workers"]) for m in models] == [(MODEL, 0)]  # served before: still accepted
    assert (await client.get(f"/v1/models/{MODEL}")).json()["workers"] == 0


async def test_metrics_and_openapi(client, worker):
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "temperature": 9})
    text = (await client.get("/metrics")).text
    assert 'tokenq_gateway_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in text
    assert 'route="/v1/completions",status="400"' in text
    assert f'tokenq_gateway_jobs_enqueued_total{{lane="interactive",model="{MODEL}"}} 1.0' in text
    assert "tokenq_gateway_request_seconds_bucket" in text
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/jobs/{job_id}/events" in spec["paths"]



def jobs_ended(text: str, reason: str) -> float:
    """tokenq_gateway_jobs_ended_total of MODEL for `reason` in a scrape (0 when the series is absent)."""
    found = re.search(rf'^tokenq_gateway_jobs_ended_total{{model="{re.escape(MODEL)}",reason="{reason}"}} (\S+)$',
                      text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_jobs_the_gateway_ends_count_once_by_reason(app, client, redis_client):
    """Jobs the gateway ended itself (a queued job cancelled, a job past its deadline) counted in no metric.
    Each counts once, however often it is cancelled or read after, and however many reads race the sweep;
    a running job's cancel is its worker's to carry out, and counts here only when its deadline ends it."""
    await idle_worker_again(redis_client)  # live and serving MODEL, takes nothing: jobs stay queued
    queued = (await client.post("/v1/jobs", json=PROMPT)).json()["id"]
    for _ in range(2):  # the second finds it final
        assert (await client.delete(f"/v1/jobs/{queued}")).json()["status"] == "cancelled"
    late = (await client.post("/v1/jobs", json={**PROMPT, "ttl": 0.2})).json()["id"]
    running = (await client.post("/v1/jobs", json={**PROMPT, "ttl": 0.2})).json()["id"]
    await app.state.ctx.store.start([running], time.time(), IDLE_WORKER)
    assert (await client.delete(f"/v1/jobs/{running}")).json()["status"] == "running"  # asked of its worker
    await asyncio.sleep(0.3)
    reads = await asyncio.gather(*(client.get(f"/v1/jobs/{late}") for _ in range(5)))  # and the sweep
    assert {r.json()["status"] for r in reads} == {"expired"}
    record = await redis_client.hgetall(keys.job_key(late))  # a sweep that lost the race reads it expired
    assert await app.state.ctx.store.expire(JobRef.of_record(late, record)) == "expired"
    text = (await client.get("/metrics")).text
    assert (jobs_ended(text, "cancelled"), jobs_ended(text, "expired")) == (1.0, 1.0)
    deadline = time.time() + 10  # the running job: past its deadline and the grace its worker has
    while (await client.get(f"/v1/jobs/{running}")).json()["status"] != "expired" and time.time() < deadline:
        await asyncio.sleep(0.1)
    text = (await client.get("/metrics")).text
    assert (jobs_ended(text, "cancelled"), jobs_ended(text, "expired")) == (1.0, 2.0)

# --- bad input: an OpenAI error body, the right status, and nothing enqueued ---------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


async def test_errors_enqueue_nothing(client, worker, redis_client):
    err = assert_error(await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model")
    assert err["code"] == "model_not_found"
    err = assert_error(await client.post("/v1/chat/completions", json={**CHAT, "temperature": 5}), 400,
                       "temperature")
    assert "temperature" in err["message"] and "2" in err["message"]
    assert_error(await client.post("/v1/chat/completions", json={**CHAT, "n": 17}), 400, "n")
    assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "n": 0}), 400, "n")
    assert_error(await client.post("/v1/jobs", json={"model": MODEL, "prompt": ["a", "b"]}), 400, "prompt")
    # Several prompts: one that is bad refuses the request before any of them is queued.
    err = assert_error(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": ["a", "hello " * 1000], "max_tokens": 1500}), 400, "max_tokens")
    assert "2048" in err["message"]
    err = assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 129}),
                       400, "prompt")
    assert "128" in err["message"] and "129" in err["message"]
    long_prompt = "hello " * 3000
    err = assert_error(await client.post("/v1/completions", json={  # too long alone: the prompt is named
        "model": MODEL, "prompt": long_prompt, "max_tokens": 16}), 400, "prompt")
    assert re.search(r"maximum context length is 2048 tokens. However, your prompt has 300\d tokens",
                     err["message"]), err["message"]
    assert err["code"] == "context_length_exceeded"  # as OpenAI's, which clients look for
    err = assert_error(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hello " * 1000, "max_tokens": 1500}), 400, "max_tokens")
    assert re.search(r"maximum context length is 2048 tokens. However, you requested 25\d\d tokens \(100\d in "
                     r"the prompt, 1500 for max_tokens\)", err["message"]), err["message"]
    assert err["code"] == "context_length_exceeded"
    err = assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}),
                       400, "prompt")
    assert "2048" in err["message"]
    err = assert_error(await client.post("/v1/chat/completions", json={
        **CHAT, "messages": [{"role": "user", "content": "hi " * 1000}], "max_tokens": 1500}), 400, "max_tokens")
    assert "1500" in err["message"] and "2048" in err["message"]
    assert_error(await client.post("/v1/completions", content=b'{"model": "x", "prompt": ',
                                   headers={"content-type": "application/json"}), 400)
    assert_error(await client.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")
    assert_error(await client.post("/v1/chat/completions", json={
        **CHAT, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role")
    big = {"model": MODEL, "prompt": "x" * (2 << 20)}
    err = assert_error(await client.post("/v1/completions", json=big), 413)
    assert err["code"] == "request_too_large"
    assert_error(await client.post("/v1/jobs", json={"model": MODEL, "prompt": "a",
                                                      "metadata": {str(i): "v" for i in range(17)}}), 400,
                 "metadata")
    assert_error(await client.post("/v1/jobs", json={"model": MODEL}), 400)
    assert_error(await client.post("/v1/jobs", json={**CHAT, "priority": "urgent"}), 400, "priority")
    assert_error(await client.post("/v1/jobs", json={**CHAT, "min_tokens": 9, "max_tokens": 3}), 400)
    assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400, "prompt")
    assert await stream_lengths(redis_client) == {lane: 0 for lane in keys.LANES}
    assert await redis_client.keys(keys.job_keys_pattern()) == []


async def test_known_model_without_worker_queues_and_waits(client, redis_url, default_model_dir, redis_client,
                                                           monkeypatch):
    """Workers restart and scale to zero: a model one has served is accepted and its jobs wait for the next
    worker; a completion that a client waits for gives up after NO_WORKER_WAIT_S with a clear 504."""
    from gateway import routes_openai

    monkeypatch.setattr(routes_openai, "NO_WORKER_WAIT_S", 0.5)
    w = FakeWorker(redis_url, default_model_dir)
    await w.start()
    await w.stop()  # its card stays, its heartbeat is gone
    job = await client.post("/v1/jobs", json=CHAT)
    assert job.status_code == 202 and job.json()["status"] == "queued"
    err = assert_error(await client.post("/v1/chat/completions", json=CHAT), 504)
    assert err["code"] == "no_worker" and "0.5s" in err["message"]
    # A stream has no response to give up on: its job is cancelled with the same reason, which ends it.
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
        body = (await streamed.aread()).decode()
    events = [json.loads(x.removeprefix("data: ")) for x in body.split("\n\n") if x.startswith("data: {")]
    assert events[-1]["error"]["type"] == events[-1]["error"]["code"] == "no_worker"  # as the response's code
    assert "0.5s" in events[-1]["error"]["message"]
    assert body.rstrip().endswith("data: [DONE]")
    w = FakeWorker(redis_url, default_model_dir)  # a worker comes back: the queued job runs
    await w.start()
    try:
        for _ in range(200):
            status = (await client.get(f"/v1/jobs/{job.json()['id']}")).json()["status"]
            if status == "succeeded":
                break
            await asyncio.sleep(0.05)
        assert status == "succeeded"
    finally:
        await w.stop()
    assert_error(await client.post("/v1/jobs", json={**CHAT, "model": "never-served"}), 404)


async def test_body_limit_uses_bytes_read_not_only_content_length(redis_url, redis_client):
    app = create_app(redis_url, max_body_bytes=1000)

    async def chunks():
        for _ in range(3):
            yield b"x" * 600

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


async def test_unknown_route_and_redis_down(client):
    err = assert_error(await client.get("/v1/nothing-here"), 404)
    assert err["type"] == "invalid_request_error"
    app = create_app("redis://127.0.0.1:1/0")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw") as c:
            r = await c.get("/readyz")
            assert r.status_code == 503 and "redis" in r.json()["reason"]
            assert_error(await c.post("/v1/chat/completions", json=CHAT), 503)
            assert (await c.get("/healthz")).status_code == 200


async def test_failed_job_in_streams(client, worker):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "FAIL_ME now"}], "stream": True})
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "engine_error"
    job = (await client.post("/v1/jobs", json={"model": MODEL, "prompt": "FAIL_ME"})).json()
    r = await client.get(f"/v1/jobs/{job['id']}/events")
    last = [e for e in r.text.split("\n\n") if e.strip()][-1]
    assert "event: failed" in last
    data = json.loads(last.split("data: ", 1)[1])
    assert data["status"] == "failed" and data["error"]["type"] == "engine_error"
    r = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "abc"})
    assert_error(r, 400, "Last-Event-ID")
    r = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "3,4"})  # one choice
    assert "1 choice" in assert_error(r, 400, "Last-Event-ID")["message"]


async def test_jobs_refuse_a_field_they_do_not_know(client, redis_client):
    """tokenq's own API: a misspelt `webhook_url` is an error, not a job that never reports."""
    r = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "hi", "webhook": "https://example.com/h"})
    assert "webhook: Extra inputs are not permitted" in assert_error(r, 400, "webhook")["message"]
    assert await redis_client.keys(keys.job_keys_pattern("*")) == []


async def test_a_content_part_other_than_text_is_an_unsupported_field(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    err = assert_error(r, 400)
    assert err["code"] == "unsupported_field" and "only text content parts" in err["message"]


async def test_a_body_sent_as_a_form_says_it_wants_json(client):
    r = await client.post("/v1/chat/completions", content=json.dumps(CHAT),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    message = assert_error(r, 400)["message"]
    assert "Content-Type: application/json" in message and "x-www-form-urlencoded" in message
    r = await client.post("/v1/chat/completions", json=[CHAT])  # JSON, but an array
    assert assert_error(r, 400)["message"] == "request body: a JSON object (got list)"


async def test_chat_template_options(client, worker, redis_client, default_model_dir):
    """vLLM's add_generation_prompt, continue_final_message and chat_template_kwargs: the job's prompt is
    what transformers renders with them; a bad combination is a 400 naming the field and queues nothing."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_dir))
    prefilled = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    r = await client.post("/v1/jobs", json={"model": MODEL, "messages": prefilled, "max_tokens": 2,
                                            "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 202, r.text
    payload = JobPayload.model_validate_json(await redis_client.hget(keys.job_key(r.json()["id"]), F.PAYLOAD))
    theirs = hf.apply_chat_template(prefilled, add_generation_prompt=False, continue_final_message=True,
                                    tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "input_ids") or isinstance(theirs, dict) else theirs
    assert payload.prompt_token_ids == list(theirs)
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": prefilled, "max_tokens": 2,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text  # a variable the template does not read changes nothing

    jobs = len(await redis_client.keys(keys.job_keys_pattern()))
    err = assert_error(await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": prefilled, "continue_final_message": True}), 400, "continue_final_message")
    assert "add_generation_prompt" in err["message"]
    assert_error(await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": prefilled, "chat_template_kwargs": {"messages": []}}), 400,
        "chat_template_kwargs.messages")
    assert_error(await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [*prefilled[:1], {"role": "assistant", "content": " "}],
        "add_generation_prompt": False, "continue_final_message": True}), 400, "continue_final_message")
    assert_error(await client.post("/v1/jobs", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                      "chat_template_kwargs": {"a": 1}}), 400,
                 "chat_template_kwargs")
    assert len(await redis_client.keys(keys.job_keys_pattern())) == jobs


async def test_a_model_reads_the_same_each_time_and_by_a_name_with_slashes(client, redis_client, default_model_dir):
    """`created` is the card's (its worker's start), not a heartbeat's; a served name may hold slashes."""
    from protocol.workers import WorkerHeartbeat
    from tests.integration.fake_worker import model_card

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = model_card(default_model_dir, 2048).model_copy(update={"name": name, "created": 1_700_000_000})
    await redis_client.hset(keys.model_card_key(name), "card", card.model_dump_json())
    await redis_client.sadd(keys.MODELS_SET, name)
    for beat_at in (time.time(), time.time() + 5):  # a heartbeat later: the model object is the same
        beat = WorkerHeartbeat(worker_id="test:slash", model=name, max_model_len=2048, capacity=8, at=beat_at)
        await redis_client.set(keys.worker_key("test:slash"), beat.model_dump_json(), ex=60)
        await redis_client.sadd(keys.WORKERS_SET, "test:slash")
        r = await client.get(f"/v1/models/{name}")
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["created"], r.json()["workers"]) == (name, 1_700_000_000, 1)
        listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert listed[name]["created"] == 1_700_000_000


async def test_metrics_ask_for_their_token_when_one_is_set(redis_url, monkeypatch):
    """Its series name tenants and their traffic: a public gateway port hands them only to Prometheus."""
    monkeypatch.setenv("TOKENQ_METRICS_TOKEN", "s3cret")
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = await c.get("/metrics", headers=headers)
                assert r.status_code == 401 and "TOKENQ_METRICS_TOKEN" in r.json()["error"]["message"]
                assert "s3cret" not in r.text
            r = await c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and "tokenq_gateway_requests_total" in r.text


async def test_metrics_ask_for_the_token_of_the_token_file(redis_url, monkeypatch, tmp_path):
    """docker-compose.yml's way: the gateway makes the token in a file that Prometheus reads."""
    path = tmp_path / "metrics-token"
    monkeypatch.delenv("TOKENQ_METRICS_TOKEN", raising=False)
    monkeypatch.setenv("TOKENQ_METRICS_TOKEN_FILE", str(path))
    app = create_app(redis_url)
    token = path.read_text().strip()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.get("/metrics")
            assert r.status_code == 401 and "TOKENQ_METRICS_TOKEN_FILE" in r.json()["error"]["message"]
            r = await c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and "tokenq_gateway_requests_total" in r.text
