"""Issue 4 at the gateway, against a real Redis: API keys, per-tenant limits, queue depth, idempotency,
cancellation, deadlines and webhook URLs. Most tests use an idle worker (a heartbeat and a model card,
nothing consuming) so that jobs stay queued where the test can look at them."""

from __future__ import annotations

import asyncio
import calendar
import json
import math
import time

import httpx
import pytest

from gateway.apikeys import API_KEYS_SET, create_key, list_keys, revoke_key, set_auth
from gateway.app import create_app
from gateway.event_hub import event_hub
from gateway.prompt_list import prompt_key
from jobstore.connect import is_cluster_url
from jobstore.store import RATE_WINDOW_S
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobPayload
from protocol.sampling import SamplingParams
from protocol.workers import WorkerHeartbeat
from tests.asserts import assert_error
from tests.fakes import lane_streams
from tests.integration.fake_worker import MODEL, FakeWorker, model_card

# Every test here runs on one redis-server and on a three-node cluster (tests/conftest.py).
pytestmark = pytest.mark.both_redis

IDLE_WORKER = "test:idle-worker"
PROMPT = {"model": MODEL, "prompt": "one two three", "max_tokens": 8}


async def idle_worker_again(redis_client) -> None:
    from tokenq.model_store import ensure_model
    from tokenq.settings import DEFAULT_MODEL

    card = model_card(ensure_model(DEFAULT_MODEL), 2048)
    beat = WorkerHeartbeat(worker_id=IDLE_WORKER, model=MODEL, max_model_len=2048, capacity=8)
    await redis_client.hset(keys.model_card_key(MODEL), "card", card.model_dump_json())
    await redis_client.set(keys.worker_key(IDLE_WORKER), beat.model_dump_json(), ex=600)
    await redis_client.sadd(keys.WORKERS_SET, IDLE_WORKER)
    await redis_client.sadd(keys.MODELS_SET, MODEL)


@pytest.fixture
async def idle_worker(redis_client, default_model_dir):
    """A worker that looks alive and serves MODEL but takes nothing off the streams."""
    await idle_worker_again(redis_client)
    yield
    await redis_client.delete(keys.worker_key(IDLE_WORKER))


def make_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)


@pytest.fixture
async def app(redis_url, redis_client):
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        app.state.ctx.auth.cache_s = app.state.ctx.auth.stale_s = 0  # see key and limit changes at once
        yield app


@pytest.fixture
async def client(app):
    async with make_client(app) as c:
        yield c


async def queued_entries(redis_client, lane: str = "default") -> int:
    return sum([await redis_client.xlen(s) for s in await lane_streams(redis_client, MODEL, lane)])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- API keys ---------------------------------------------------------------------------------------------


async def test_no_keys_means_default_tenant(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json=PROMPT)
    assert r.status_code == 202, r.text
    record = await redis_client.hgetall(keys.job_key(r.json()["id"]))
    assert record[F.TENANT] == "default"
    assert JobPayload.model_validate_json(record[F.PAYLOAD]).tenant == "default"


async def test_keys_turn_auth_on(client, idle_worker, redis_client):
    created = await create_key(redis_client, "acme", {"rpm": 100})
    assert created.api_key.startswith("tq_") and created.webhook_secret.startswith("whsec_")
    # Only the digest is stored.
    assert await redis_client.smembers(API_KEYS_SET) == {created.digest}
    assert created.api_key not in json.dumps(await redis_client.hgetall(keys.api_key_key(created.digest)))
    assert await redis_client.hget(keys.tenant_key("acme"), "rpm") == "100"

    err = assert_error(await client.post("/v1/jobs", json=PROMPT), 401)
    assert err["code"] == "invalid_api_key"
    assert_error(await client.post("/v1/jobs", json=PROMPT, headers=bearer("tq_wrong")), 401)
    assert_error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 401)
    assert_error(await client.get("/v1/models"), 401)
    assert (await client.get("/healthz")).status_code == 200

    r = await client.post("/v1/jobs", json=PROMPT, headers=bearer(created.api_key))
    assert r.status_code == 202, r.text
    record = await redis_client.hgetall(keys.job_key(r.json()["id"]))
    assert record[F.TENANT] == "acme"
    assert JobPayload.model_validate_json(record[F.PAYLOAD]).tenant == "acme"
    assert await redis_client.xlen(keys.jobs_stream(MODEL, "default", "acme")) == 1

    spare = await create_key(redis_client, "other", {})
    assert await revoke_key(redis_client, created.digest[:12]) == [created.digest]
    assert_error(await client.post("/v1/jobs", json=PROMPT, headers=bearer(created.api_key)), 401)
    assert [row["tenant"] for row in await list_keys(redis_client)] == ["other"]
    # The last key gone: auth stays on (fails closed) until an operator turns it off.
    await revoke_key(redis_client, spare.api_key)
    assert_error(await client.post("/v1/jobs", json=PROMPT), 401)
    await set_auth(redis_client, False)
    assert (await client.post("/v1/jobs", json=PROMPT)).status_code == 202


async def test_auth_stays_on_when_redis_loses_the_keys(client, idle_worker, redis_client):
    created = await create_key(redis_client, "acme", {})
    assert (await client.post("/v1/jobs", json=PROMPT, headers=bearer(created.api_key))).status_code == 202
    await redis_client.flushdb()  # the key set and the flag are gone (a replaced or flushed Redis)
    await idle_worker_again(redis_client)
    assert_error(await client.post("/v1/jobs", json=PROMPT), 401)
    assert_error(await client.post("/v1/jobs", json=PROMPT, headers=bearer(created.api_key)), 401)


async def test_require_auth_forces_it_on(redis_url, redis_client, idle_worker, monkeypatch):
    monkeypatch.setenv("TOKENQ_REQUIRE_AUTH", "1")
    app = create_app(redis_url)
    async with app.router.lifespan_context(app), make_client(app) as client:
        await set_auth(redis_client, False)
        assert await redis_client.scard(API_KEYS_SET) == 0
        assert_error(await client.post("/v1/jobs", json=PROMPT), 401)
        created = await create_key(redis_client, "acme", {})
        await set_auth(redis_client, False)
        app.state.ctx.auth.cache_s = 0
        r = await client.post("/v1/jobs", json=PROMPT, headers=bearer(created.api_key))
        assert r.status_code == 202, r.text


async def test_webhook_secret_is_kept_and_keys_list(redis_client):
    first = await create_key(redis_client, "acme", {})
    second = await create_key(redis_client, "acme", {"tpm": 5000, "max_queued": 3})
    assert first.webhook_secret == second.webhook_secret
    assert first.api_key != second.api_key
    rows = await list_keys(redis_client)
    assert {r["id"] for r in rows} == {first.digest, second.digest}
    assert all(r["tenant"] == "acme" and r["tpm"] == "5000" and r["max_queued"] == "3" for r in rows)
    assert await revoke_key(redis_client, second.api_key) == [second.digest]
    assert await revoke_key(redis_client, "f" * 64) == []
    with pytest.raises(ValueError):
        await create_key(redis_client, "a:b", {})


def test_cli_keys(redis_url, capsys):
    import redis

    from tokenq.cli import main

    if is_cluster_url(redis_url):
        from redis.cluster import RedisCluster

        sync = RedisCluster.from_url(redis_url.replace("+cluster", ""), decode_responses=True)
        sync.flushdb(target_nodes=sync.PRIMARIES)
    else:
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        sync.flushdb()

    with pytest.raises(SystemExit) as done:
        main(["keys", "create", "--tenant", "cli-t", "--rpm", "7", "--tpm", "0", "--redis-url", redis_url])
    assert done.value.code == 0
    out = capsys.readouterr().out
    api_key = next(line.split()[-1] for line in out.splitlines() if line.startswith("api key:"))
    secret = next(line.split()[-1] for line in out.splitlines() if line.startswith("webhook secret:"))
    assert api_key.startswith("tq_") and secret.startswith("whsec_")
    with pytest.raises(SystemExit):
        main(["keys", "list", "--redis-url", redis_url])
    listed = capsys.readouterr().out
    assert "cli-t" in listed and "\t7\t-\t-" in listed and api_key not in listed  # tpm 0: no limit, as unset
    with pytest.raises(SystemExit) as done:
        main(["keys", "revoke", api_key, "--redis-url", redis_url])
    assert done.value.code == 0
    assert sync.scard(API_KEYS_SET) == 0
    assert sync.hget(keys.tenant_key("cli-t"), "webhook_secret") == secret
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["keys", "secret", "--tenant", "cli-t", "--redis-url", redis_url])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == secret  # the one the key's tenant signs with
    with pytest.raises(SystemExit) as done:
        main(["keys", "secret", "--redis-url", redis_url])  # the `default` tenant's, made on first use and kept
    made = capsys.readouterr().out.strip()
    assert made.startswith("whsec_") and sync.hget(keys.tenant_key("default"), "webhook_secret") == made
    with pytest.raises(SystemExit) as done:
        main(["keys", "secret", "--rotate", "--redis-url", redis_url])
    rotated = capsys.readouterr().out.strip()
    assert rotated.startswith("whsec_") and rotated != made
    assert sync.hget(keys.tenant_key("default"), "webhook_secret") == rotated
    assert sync.hget(keys.tenant_key("cli-t"), "webhook_secret") == secret  # another tenant's is untouched
    with pytest.raises(SystemExit) as done:
        main(["keys", "secret", "--tenant", "a:b", "--redis-url", redis_url])
    assert done.value.code == "error: tenant: 1 to 64 characters, no ':'"
    with pytest.raises(SystemExit) as done:
        main(["keys", "auth", "--redis-url", redis_url])
    assert "auth: on" in capsys.readouterr().out  # no key left, and still on
    with pytest.raises(SystemExit) as done:
        main(["keys", "auth", "off", "--redis-url", redis_url])
    assert done.value.code == 0 and "auth: off" in capsys.readouterr().out
    # A setting out of range is refused before anything is written (it was stored, and read as no limit
    # or as the default).
    for argv, message in [(["--rpm", "-5"], "error: rpm: 0 (no limit) or more, got -5"),
                          (["--max-queued", "-1"], "error: max_queued: 0 (no limit) or more, got -1"),
                          (["--cache-threshold", "2"], "error: cache_threshold: 0.0 to 1.0, got 2.0"),
                          (["--cache-ttl", "0"], "error: cache_ttl: 1 to 1,000,000,000, got 0")]:
        with pytest.raises(SystemExit) as done:
            main(["keys", "create", "--tenant", "bad-t", *argv, "--redis-url", redis_url])
        assert done.value.code == message
    assert not sync.exists(keys.tenant_key("bad-t")) and sync.scard(API_KEYS_SET) == 0


async def test_jobs_of_other_tenants_are_not_found(client, idle_worker, redis_client):
    a = await create_key(redis_client, "a", {})
    b = await create_key(redis_client, "b", {})
    job_id = (await client.post("/v1/jobs", json=PROMPT, headers=bearer(a.api_key))).json()["id"]
    assert (await client.get(f"/v1/jobs/{job_id}", headers=bearer(a.api_key))).status_code == 200
    assert_error(await client.get(f"/v1/jobs/{job_id}", headers=bearer(b.api_key)), 404)
    assert_error(await client.delete(f"/v1/jobs/{job_id}", headers=bearer(b.api_key)), 404)
    assert_error(await client.get(f"/v1/jobs/{job_id}/events", headers=bearer(b.api_key)), 404)
    assert await redis_client.hget(keys.job_key(job_id), F.STATE) == "queued"


# --- limits -------------------------------------------------------------------------------------------------


async def test_rpm_limit_holds_across_two_gateways(app, redis_url, idle_worker, redis_client):
    key = (await create_key(redis_client, "r", {"rpm": 3})).api_key
    other = create_app(redis_url)
    async with other.router.lifespan_context(other), make_client(app) as c1, make_client(other) as c2:
        codes = [(await c.post("/v1/jobs", json=PROMPT, headers=bearer(key))).status_code
                 for c in (c1, c2, c1, c2, c1)]
        r = await c2.post("/v1/jobs", json=PROMPT, headers=bearer(key))
    assert codes == [202, 202, 202, 429, 429]
    err = assert_error(r, 429)
    assert "rpm" in err["message"] and "limit 3" in err["message"] and err["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 120
    assert await queued_entries(redis_client) == 3


async def test_tpm_limit_counts_prompt_and_max_tokens(client, idle_worker, redis_client):
    key = (await create_key(redis_client, "t", {"tpm": 100})).api_key
    body = {**PROMPT, "max_tokens": 40}  # a few prompt tokens + 40
    assert (await client.post("/v1/jobs", json=body, headers=bearer(key))).status_code == 202
    assert (await client.post("/v1/jobs", json=body, headers=bearer(key))).status_code == 202
    r = await client.post("/v1/jobs", json=body, headers=bearer(key))
    err = assert_error(r, 429)
    assert "tpm" in err["message"] and "limit 100" in err["message"] and err["type"] == "tokens"
    assert int(r.headers["Retry-After"]) >= 1
    # A request that alone is larger than the limit can never pass: a 400, no Retry-After to follow for ever.
    r = await client.post("/v1/jobs", json={**PROMPT, "max_tokens": 500}, headers=bearer(key))
    err = assert_error(r, 400)
    assert "too large" in err["message"] and err["code"] == "request_too_large" and err["param"] == "max_tokens"
    assert "Retry-After" not in r.headers
    assert await queued_entries(redis_client) == 2


async def test_a_request_larger_than_the_tpm_is_a_400_when_the_rpm_is_used_up_too(client, idle_worker, redis_client):
    """It was a 429 for the rpm: the client waited a minute to be told it could never run."""
    key = (await create_key(redis_client, "lim", {"rpm": 2, "tpm": 100})).api_key
    for _ in range(2):
        assert (await client.post("/v1/jobs", json={**PROMPT, "max_tokens": 5}, headers=bearer(key))).status_code == 202
    r = await client.post("/v1/jobs", json={**PROMPT, "max_tokens": 500}, headers=bearer(key))
    err = assert_error(r, 400)
    assert err["code"] == "request_too_large" and "Retry-After" not in r.headers


async def test_refused_requests_do_not_use_up_the_limit(client, idle_worker, redis_client):
    key = (await create_key(redis_client, "u", {"rpm": 2, "tpm": 30})).api_key
    big = {**PROMPT, "max_tokens": 200}  # refused by tpm: must not count as a request
    for _ in range(3):
        assert_error(await client.post("/v1/jobs", json=big, headers=bearer(key)), 400)
    assert (await client.post("/v1/jobs", json=PROMPT, headers=bearer(key))).status_code == 202


async def test_max_queued_and_cancel_frees_a_slot(client, idle_worker, redis_client):
    key = (await create_key(redis_client, "q", {"max_queued": 2})).api_key
    ids = [(await client.post("/v1/jobs", json=PROMPT, headers=bearer(key))).json()["id"] for _ in range(2)]
    assert await redis_client.get(keys.tenant_queued_key("q", MODEL)) == "2"
    r = await client.post("/v1/jobs", json=PROMPT, headers=bearer(key))
    err = assert_error(r, 429)
    assert "max_queued" in err["message"] and r.headers["Retry-After"] == "1"
    assert (await client.delete(f"/v1/jobs/{ids[0]}", headers=bearer(key))).json()["status"] == "cancelled"
    assert await redis_client.get(keys.tenant_queued_key("q", MODEL)) == "1"
    assert (await client.post("/v1/jobs", json=PROMPT, headers=bearer(key))).status_code == 202


async def test_queue_depth_429_and_a_known_model_waits_without_worker(redis_url, redis_client, idle_worker):
    app = create_app(redis_url, max_queue_depth=2)
    async with app.router.lifespan_context(app):
        async with make_client(app) as c:
            for _ in range(2):
                assert (await c.post("/v1/jobs", json=PROMPT)).status_code == 202
            r = await c.post("/v1/jobs", json=PROMPT)
            err = assert_error(r, 429)
            assert err["code"] == "queue_full" and "max queue depth 2" in err["message"]
            assert r.headers["Retry-After"] == "1"
            # Another lane is not full.
            assert (await c.post("/v1/jobs", json={**PROMPT, "priority": "batch"})).status_code == 202
    await redis_client.delete(keys.worker_key(IDLE_WORKER))
    app = create_app(redis_url)  # a fresh gateway: nothing cached, and no worker is live
    async with app.router.lifespan_context(app), make_client(app) as c:
        assert (await c.get("/readyz")).status_code == 200
        r = await c.post("/v1/jobs", json=PROMPT)
        assert r.status_code == 202, r.text
        assert (await c.get(f"/v1/jobs/{r.json()['id']}")).json()["status"] == "queued"
        err = assert_error(await c.post("/v1/jobs", json={**PROMPT, "model": "never-served"}), 404)
        assert err["code"] == "model_not_found"
        models = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["workers"]) for m in models] == [(MODEL, 0)]


async def test_lane_depth_is_shared_fairly_between_tenants(redis_url, redis_client, idle_worker):
    """One tenant filling the lane does not lock the others out: each gets its share of the depth."""
    big = (await create_key(redis_client, "big", {})).api_key
    small = (await create_key(redis_client, "small", {})).api_key
    app = create_app(redis_url, max_queue_depth=4)
    async with app.router.lifespan_context(app), make_client(app) as c:
        for _ in range(4):
            assert (await c.post("/v1/jobs", json=PROMPT, headers=bearer(big))).status_code == 202
        assert_error(await c.post("/v1/jobs", json=PROMPT, headers=bearer(big)), 429)
        # The lane is full, but `small` holds less than its share (4 / 2 tenants).
        for _ in range(2):
            assert (await c.post("/v1/jobs", json=PROMPT, headers=bearer(small))).status_code == 202
        err = assert_error(await c.post("/v1/jobs", json=PROMPT, headers=bearer(small)), 429)
        assert err["code"] == "queue_full" and "2 jobs" in err["message"]
        assert await redis_client.hgetall(keys.lane_depth_key(MODEL, "default")) == {"big": "4", "small": "2"}


async def test_max_queued_holds_under_100_concurrent_submissions(redis_url, redis_client, idle_worker):
    key = (await create_key(redis_client, "burst", {"max_queued": 20})).api_key
    app = create_app(redis_url)
    async with app.router.lifespan_context(app), make_client(app) as c:
        answers = await asyncio.gather(*(c.post("/v1/jobs", json=PROMPT, headers=bearer(key))
                                         for _ in range(100)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(202) == 20 and codes.count(429) == 80
    assert await redis_client.get(keys.tenant_queued_key("burst", MODEL)) == "20"
    assert await redis_client.xlen(keys.jobs_stream(MODEL, "default", "burst")) == 20


async def test_lane_depth_holds_under_100_concurrent_submissions(redis_url, redis_client, idle_worker):
    app = create_app(redis_url, max_queue_depth=20)
    async with app.router.lifespan_context(app), make_client(app) as c:
        answers = await asyncio.gather(*(c.post("/v1/jobs", json=PROMPT) for _ in range(100)))
    assert sorted(a.status_code for a in answers).count(202) == 20
    assert await queued_entries(redis_client) == 20


# --- idempotency ----------------------------------------------------------------------------------------


async def test_idempotent_job_submission(client, idle_worker, redis_client):
    headers = {"Idempotency-Key": "order-17"}
    first = await client.post("/v1/jobs", json={**PROMPT, "metadata": {"n": "1"}}, headers=headers)
    again = await client.post("/v1/jobs", json={"metadata": {"n": "1"}, **dict(reversed(PROMPT.items()))},
                              headers=headers)  # the same request, its fields in another order
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert await queued_entries(redis_client) == 1
    assert await redis_client.get(keys.idem_key("default", "order-17", MODEL)) == first.json()["id"]
    assert 86000 < await redis_client.ttl(keys.idem_key("default", "order-17", MODEL)) <= 86400
    assert await redis_client.hget(keys.job_key(first.json()["id"]), F.IDEMPOTENCY_KEY) == "order-17"
    # Another key, or the same key of another tenant, is another job.
    other = await client.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": "order-18"})
    assert other.json()["id"] != first.json()["id"]
    t = await create_key(redis_client, "t2", {})
    mine = await client.post("/v1/jobs", json=PROMPT, headers={**headers, **bearer(t.api_key)})
    assert mine.json()["id"] not in (first.json()["id"], other.json()["id"])
    assert_error(await client.post("/v1/jobs", json=PROMPT, headers={**bearer(t.api_key),
                                                                    "Idempotency-Key": "x" * 300}),
                 400, "Idempotency-Key")


async def test_a_repeat_with_objects_in_another_order_or_numbers_spelt_otherwise_replays(client, idle_worker):
    """JSON object members have no order (RFC 8259), 1 and 1.0 are one number, and a null field is its
    default: the same request."""
    headers = {"Idempotency-Key": "order-20"}
    body = {**PROMPT, "metadata": {"a": "1", "b": "2"}, "logit_bias": {"100": 1, "200": -2.5}}
    first = await client.post("/v1/jobs", json=body, headers=headers)
    same = {**PROMPT, "metadata": {"b": "2", "a": "1"}, "logit_bias": {"200": -2.5, "100": 1.0}, "seed": None}
    again = await client.post("/v1/jobs", json=same, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize("change", [{"metadata": {"n": "2"}}, {"max_tokens": 5}, {"temperature": 0.5},
                                    {"webhook_url": "https://example.com/hook"}, {"logit_bias": {"100": 2}}])
async def test_a_key_repeated_with_another_request_is_refused(client, idle_worker, redis_client, change):
    """A retry that changed the request would get the first job's answer to another question: a 422 (as the
    IETF's Idempotency-Key draft and Stripe answer it), and no second job."""
    headers = {"Idempotency-Key": "order-19"}
    body = {**PROMPT, "max_tokens": 4, "metadata": {"n": "1"}}
    first = await client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202
    err = assert_error(await client.post("/v1/jobs", json={**body, **change}, headers=headers), 422)
    assert err["code"] == "idempotency_key_reused" and err["param"] == "Idempotency-Key"
    assert first.json()["id"] in err["message"]
    assert await queued_entries(redis_client) == 1
    again = await client.post("/v1/jobs", json={**body, "stream": True}, headers=headers)  # delivery only
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]


async def test_concurrent_repeats_make_one_job(client, idle_worker, redis_client):
    headers = {"Idempotency-Key": "burst"}
    rs = await asyncio.gather(*(client.post("/v1/jobs", json=PROMPT, headers=headers) for _ in range(8)))
    assert {r.status_code for r in rs} == {202}
    assert len({r.json()["id"] for r in rs}) == 1
    assert await queued_entries(redis_client) == 1


async def test_repeat_without_its_job_releases_the_key(client, idle_worker, redis_client):
    """A key whose job is gone (evicted) is released, so the client's retry goes through."""
    await redis_client.set(keys.idem_key("default", "lost", MODEL), "job_never_written", ex=100)
    err = assert_error(await client.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": "lost"}), 409)
    assert err["code"] == "idempotency_key_in_use"
    r = await client.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": "lost"})
    assert r.status_code == 202 and r.json()["id"] != "job_never_written"


async def test_idempotent_completion_returns_the_first_result(client, redis_url, redis_client, default_model_dir):
    worker = FakeWorker(redis_url, default_model_dir)
    await worker.start()
    try:
        headers = {"Idempotency-Key": "chat-1"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "red green"}]}
        first = await client.post("/v1/chat/completions", json=body, headers=headers)
        again = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert first.status_code == again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["choices"] == first.json()["choices"]
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        chunks = [json.loads(x.removeprefix("data: ")) for x in streamed.text.split("\n\n")
                  if x.startswith("data: {")]
        assert {c["id"] for c in chunks} == {first.json()["id"]}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == first.json()["choices"][0]["message"]["content"]
        assert len(await redis_client.keys(keys.job_keys_pattern())) == 1
    finally:
        await worker.stop()


# --- cancellation -------------------------------------------------------------------------------------------


async def test_cancel_a_queued_job(client, idle_worker, redis_client):
    job_id = (await client.post("/v1/jobs", json=PROMPT)).json()["id"]
    stream = keys.jobs_stream(MODEL, "default", "default")
    entry_id = await redis_client.hget(keys.job_key(job_id), F.ENTRY_ID)
    assert [e[0] for e in await redis_client.xrange(stream)] == [entry_id]
    hub = event_hub(redis_client)  # SUBSCRIBE, or SSUBSCRIBE on a cluster
    async with hub.join(keys.events_channel(job_id)) as sub:
        r = await client.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "cancelled" and job["error"]["type"] == "cancelled" and job["finished_at"]
        assert await redis_client.xlen(stream) == 0
        assert await redis_client.get(keys.tenant_queued_key("default", MODEL)) == "0"
        assert 0 < await redis_client.ttl(keys.job_key(job_id)) <= F.RETENTION_SECONDS
        event = await sub.get(2.0)
    await hub.aclose()
    assert event and json.loads(event)["state"] == "cancelled"
    # Final already: unchanged, still 200.
    again = await client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"
    assert_error(await client.delete("/v1/jobs/job_nope"), 404)


async def test_cancel_a_running_job_asks_its_worker(client, idle_worker, redis_client):
    job_id = (await client.post("/v1/jobs", json=PROMPT)).json()["id"]
    await redis_client.hset(keys.job_key(job_id), F.STATE, "running")  # as a worker's START does
    hub = event_hub(redis_client)
    async with hub.join(keys.control_channel(MODEL)) as sub:
        r = await client.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "running"
        assert await redis_client.hget(keys.job_key(job_id), F.CANCEL_REQUESTED) == "1"
        message = await sub.get(2.0)
    await hub.aclose()
    assert message and json.loads(message) == {"cancel": job_id}
    # The entry stays for the worker to acknowledge when it ends the job.
    assert await queued_entries(redis_client) == 1


async def test_cancelled_job_is_dropped_by_a_worker(client, idle_worker, redis_url, redis_client,
                                                    default_model_dir):
    job_id = (await client.post("/v1/jobs", json=PROMPT)).json()["id"]
    await client.delete(f"/v1/jobs/{job_id}")
    worker = FakeWorker(redis_url, default_model_dir)
    await worker.start()
    await asyncio.sleep(0.3)
    await worker.stop()
    assert await redis_client.hget(keys.job_key(job_id), F.STATE) == "cancelled"


# --- deadlines and webhooks --------------------------------------------------------------------------------


async def test_deadline_and_ttl(client, idle_worker, redis_client):
    r = await client.post("/v1/jobs", json={**PROMPT, "ttl": 30})
    payload = JobPayload.model_validate_json(await redis_client.hget(keys.job_key(r.json()["id"]), F.PAYLOAD))
    assert time.time() + 25 < payload.deadline <= time.time() + 30
    next_year = time.gmtime().tm_year + 1  # at most ten years ahead
    r = await client.post("/v1/jobs", json={**PROMPT, "deadline": f"{next_year}-01-01T00:00:00Z"})
    payload = JobPayload.model_validate_json(await redis_client.hget(keys.job_key(r.json()["id"]), F.PAYLOAD))
    assert payload.deadline == calendar.timegm((next_year, 1, 1, 0, 0, 0))
    assert_error(await client.post("/v1/jobs", json={**PROMPT, "deadline": time.time() - 1}), 400, "deadline")
    err = assert_error(await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "deadline": "2001-01-01T00:00:00Z"}),
        400, "deadline")
    assert "past" in err["message"]
    assert_error(await client.post("/v1/completions", json={**PROMPT, "ttl": 0}), 400, "ttl")
    assert_error(await client.post("/v1/jobs", json={**PROMPT, "deadline": "tomorrow"}), 400, "deadline")
    assert await queued_entries(redis_client) == 2


async def test_webhook_url_is_checked(client, idle_worker, redis_client, monkeypatch):
    monkeypatch.delenv("TOKENQ_WEBHOOK_ALLOW", raising=False)
    err = assert_error(await client.post("/v1/jobs", json={**PROMPT, "webhook_url": "http://127.0.0.1:9/hook"}),
                       400, "webhook_url")
    assert "webhook_url" in err["message"] and "TOKENQ_WEBHOOK_ALLOW" in err["message"]
    err = assert_error(await client.post("/v1/jobs", json={**PROMPT, "webhook_url": "http://localhost:9/hook"}),
                       400, "webhook_url")  # a loopback name, refused without resolving it
    assert "non-public" in err["message"]
    assert_error(await client.post("/v1/jobs", json={**PROMPT, "webhook_url": "file:///etc/passwd"}), 400,
                 "webhook_url")
    assert await queued_entries(redis_client) == 0
    monkeypatch.setenv("TOKENQ_WEBHOOK_ALLOW", "127.0.0.1/32")
    r = await client.post("/v1/jobs", json={**PROMPT, "webhook_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 202, r.text
    record = await redis_client.hgetall(keys.job_key(r.json()["id"]))
    assert record[F.WEBHOOK_URL] == "http://127.0.0.1:9/hook"
    assert JobPayload.model_validate_json(record[F.PAYLOAD]).webhook_url == "http://127.0.0.1:9/hook"
    got = (await client.get(f"/v1/jobs/{r.json()['id']}")).json()
    assert got["webhook"] == {"url": "http://127.0.0.1:9/hook", "state": "pending", "attempts": []}
    # Its cancel goes through the shared finish, which puts the job on the webhook outbox.
    await client.delete(f"/v1/jobs/{r.json()['id']}")
    outbox = await redis_client.xrange(keys.webhook_outbox(MODEL))
    assert [e[1] for e in outbox] == [{"job_id": r.json()["id"], "state": "cancelled"}]


async def test_sliding_window_and_retry_after(redis_client):
    """The previous minute's count fades out linearly; Retry-After says when the next request fits."""
    from jobstore import JobStore, Limits, Refused

    store = JobStore(redis_client)
    limits = Limits(rpm=2)

    def job(n: int) -> JobPayload:
        return JobPayload(id=keys.new_job_id(MODEL, f"w{n}"), model=MODEL, kind="completion", prompt_token_ids=[1], tenant="w",
                          sampling=SamplingParams(max_tokens=1))

    t0 = 1_000_000 * 60 + 30.0  # half way through a minute
    await store.submit(job(1), "{}", {}, False, limits, now=t0)
    await store.submit(job(2), "{}", {}, False, limits, now=t0 + 1)
    with pytest.raises(Refused) as refused:
        await store.submit(job(3), "{}", {}, False, limits, now=t0 + 2)
    # Next minute the 2 count at full weight; one fits when half of them have slid out: 30 s into it.
    assert refused.value.limit == "rpm" and math.ceil(refused.value.wait_ms / 1000) == 58
    with pytest.raises(Refused):
        await store.submit(job(3), "{}", {}, False, limits, now=t0 + 30 + 29)  # 29 s into the next minute
    await store.submit(job(3), "{}", {}, False, limits, now=t0 + 30 + 31)
    # Two minutes on, nothing is left of either.
    await store.submit(job(4), "{}", {}, False, limits, now=t0 + 150)
    await store.submit(job(5), "{}", {}, False, limits, now=t0 + 151)


async def _counted(redis_client, tenant: str) -> tuple[int, int]:
    """The tenant's rpm and tpm counts of this minute and the one before (the window's two counters)."""
    minute = int(time.time() // RATE_WINDOW_S)
    totals = []
    for limit in ("rpm", "tpm"):
        values = [await redis_client.get(keys.tenant_counter_key(tenant, MODEL, limit, m)) for m in (minute, minute - 1)]
        totals.append(sum(int(v or 0) for v in values))
    return totals[0], totals[1]


async def test_a_completion_of_several_prompts_is_refused_whole(client, idle_worker, redis_client):
    """A limit that refuses one prompt of several cancels the jobs queued before it, frees their
    Idempotency-Keys and gives back what they counted against rpm and tpm (a refused request counts towards
    no limit), so that the client's retry is queued whole and the tenant's other requests are not held up."""
    key = (await create_key(redis_client, "several", {"max_queued": 3, "rpm": 10, "tpm": 10_000})).api_key
    r = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "zero", "max_tokens": 4}, headers=bearer(key))
    assert r.status_code == 202
    before = await _counted(redis_client, "several")
    body = {"model": MODEL, "prompt": ["one", "two", "three"], "max_tokens": 4}
    r = await client.post("/v1/completions", json=body, headers={**bearer(key), "Idempotency-Key": "k1"})
    err = assert_error(r, 429)  # two prompts admitted, the third over max_queued
    assert "max_queued" in err["message"]
    assert await redis_client.get(keys.tenant_queued_key("several", MODEL)) == "1"
    for i in range(3):
        assert not await redis_client.exists(keys.idem_key("several", prompt_key("k1", i), MODEL))
    assert await _counted(redis_client, "several") == before


@pytest.mark.parametrize("limits, needle", [({"rpm": 2}, "requests per minute (rpm)"),
                                            ({"max_queued": 2}, "queued jobs (max_queued)"),
                                            ({"tpm": 20}, "tokens per minute (tpm)")])  # each prompt ~10
async def test_several_prompts_no_wait_lets_in_are_a_400(client, idle_worker, redis_client, limits, needle):
    """More prompts than the tenant's rpm or max_queued, or more tokens than its tpm, fit no minute: a 429
    would send the client to retry for ever."""
    key = (await create_key(redis_client, "small", limits)).api_key
    body = {"model": MODEL, "prompt": ["one", "two", "three"], "max_tokens": 8}
    r = await client.post("/v1/completions", json=body, headers=bearer(key), timeout=30)  # admitted: no worker
    err = assert_error(r, 400)
    assert err["code"] == "request_too_large" and needle in err["message"]
    assert await _counted(redis_client, "small") == (0, 0)
    assert await redis_client.get(keys.tenant_queued_key("small", MODEL)) in (None, "0")


async def test_a_key_used_for_a_chat_is_refused_for_a_completion(client, idle_worker, redis_client):
    """The completions route could not answer with a chat job (nor back): a 422, not a body of the wrong kind."""
    key = (await create_key(redis_client, "idem", {})).api_key
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = await client.post("/v1/jobs", json=chat, headers={**bearer(key), "Idempotency-Key": "same"})
    assert r.status_code == 202
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                          headers={**bearer(key), "Idempotency-Key": "same"})
    err = assert_error(r, 422)
    assert err["code"] == "idempotency_key_reused" and err["param"] == "Idempotency-Key"
    r = await client.post("/v1/jobs", json=chat, headers={**bearer(key), "Idempotency-Key": "same"})
    assert r.status_code == 202 and r.headers.get("idempotent-replayed") == "true"  # the same kind replays
