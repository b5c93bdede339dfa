"""The request's own options at the gateway, through its routes against a real Redis, with and without the
fast path: `deadline` (RFC 3339 date-times only, at most ten years ahead in either form), `ttl` (a JSON
number), the Idempotency-Key header (one, of printable ASCII), and a stream of several prompts whose jobs
all expire (one error event)."""

from __future__ import annotations

import json
import time

import pytest

from gateway.app import create_app
from tests.asserts import assert_error
from tests.integration.test_gateway_tenants import PROMPT, idle_worker_again, make_client

NEXT_YEAR = time.gmtime().tm_year + 1


@pytest.fixture
async def idle_worker(redis_client, default_model_dir):
    """A worker that looks alive and serves MODEL but takes nothing: jobs stay queued until they expire."""
    await idle_worker_again(redis_client)


@pytest.fixture(params=[False, True], ids=["fast-path", "library-path"])
async def client(request, redis_url, redis_client, idle_worker):
    app = create_app(redis_url, library_path=request.param)
    async with app.router.lifespan_context(app), make_client(app) as c:
        yield c


async def test_a_deadline_string_is_at_most_ten_years_ahead_as_a_number_is(client):
    for deadline in ("9999-12-31T23:59:59Z", 253402300799):
        err = assert_error(await client.post("/v1/jobs", json={**PROMPT, "deadline": deadline}), 400, "deadline")
        assert "at most 3650 days ahead" in err["message"]


@pytest.mark.parametrize("text", [f"{NEXT_YEAR}0101T000000Z", f"{NEXT_YEAR}-W01-1T00:00:00Z",  # ISO 8601's
                                  f"{NEXT_YEAR}-001T00:00:00Z", f"{NEXT_YEAR}-01-01T00:00:00"])  # no zone
async def test_a_deadline_string_is_an_rfc3339_date_time(client, text):
    err = assert_error(await client.post("/v1/jobs", json={**PROMPT, "deadline": text}), 400, "deadline")
    assert "RFC 3339" in err["message"] and "YYYY-MM-DDTHH:MM:SS[.frac] then Z or ±HH:MM" in err["message"]


async def test_rfc3339_takes_a_lower_case_t_and_z_or_a_space(client):
    for text in (f"{NEXT_YEAR}-01-01T00:00:00Z", f"{NEXT_YEAR}-01-01t00:00:00z",
                 f"{NEXT_YEAR}-01-01 01:00:00.5+01:00"):
        r = await client.post("/v1/jobs", json={**PROMPT, "deadline": text})
        assert r.status_code == 202, (text, r.text)


async def test_ttl_is_a_json_number(client):
    assert (await client.post("/v1/jobs", json={**PROMPT, "ttl": 5})).status_code == 202
    # A completion that got through would wait for its job (that no worker takes) until the ttl: short ones.
    for route, text in (("/v1/jobs", "5"), ("/v1/completions", "0.5")):
        err = assert_error(await client.post(route, json={**PROMPT, "ttl": text}), 400, "ttl")
        assert err["message"].startswith("ttl: must be a JSON number")
        err = assert_error(await client.post(route, json={**PROMPT, "ttl": True}), 400, "ttl")
        assert err["message"].startswith("ttl: must be a number")


@pytest.mark.parametrize("key", ["é", "ключ", "a\tb"])
async def test_idempotency_key_is_printable_ascii(client, key):
    r = await client.post("/v1/jobs", json=PROMPT, headers=[(b"Idempotency-Key", key.encode())])
    err = assert_error(r, 400, "Idempotency-Key")
    assert "printable ASCII" in err["message"]


async def test_idempotency_key_of_255_ascii_characters(client):
    key = "k" * 254 + "~"
    assert (await client.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": key})).status_code == 202
    err = assert_error(await client.post("/v1/jobs", json=PROMPT, headers={"Idempotency-Key": key + "x"}), 400,
                       "Idempotency-Key")
    assert "(got 256 characters)" in err["message"]


async def test_two_idempotency_keys_are_a_400_on_every_route(client):
    """Of two Idempotency-Key headers the first was used, silently: a retry that repeated the other one got
    another job. Both paths, the fast one and FastAPI's routes, answer alike."""
    chat = {"model": PROMPT["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for route, body in (("/v1/jobs", PROMPT), ("/v1/completions", PROMPT), ("/v1/chat/completions", chat)):
        r = await client.post(route, json={**body, "ttl": 0.5},  # a completion let through waits that long
                              headers=[(b"Idempotency-Key", b"a"), (b"idempotency-key", b"b")])
        err = assert_error(r, 400, "Idempotency-Key")
        assert err["message"] == "Idempotency-Key: send one key, got 2 different ones", route
    # A proxy that repeats the header sends one key twice: that is one key.
    r = await client.post("/v1/jobs", json=PROMPT, headers=[(b"Idempotency-Key", b"c"), (b"idempotency-key", b"c")])
    assert r.status_code == 202, r.text


async def test_a_stream_of_prompts_that_all_expire_ends_with_one_error(client):
    """Both jobs wait behind a worker that takes nothing and expire by the gateway's sweep."""
    r = await client.post("/v1/completions", json={**PROMPT, "prompt": ["a", "b"], "ttl": 0.5, "stream": True})
    assert r.status_code == 200, r.text
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    [error] = [json.loads(e)["error"] for e in events[:-1]]
    assert error["type"] == "deadline_exceeded"

