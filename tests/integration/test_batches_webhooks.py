"""Batch webhooks: a batch that ends (completed, cancelled, failed) is announced once through the Standard
Webhooks delivery, to its `metadata.webhook_url` or its tenant's configured URL."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis

from batches import keys as K
from protocol import job_record as F
from protocol import keys
from protocol.webhook_secret import FIELD as SECRET_FIELD
from protocol.webhook_secret import new_secret
from tests.batch_helpers import ThreadedFeeder, chat_lines, upload, wait_batch
from tests.integration.fake_worker import MODEL, ThreadedFakeWorker
from tests.integration.test_webhooks import ALLOW, Receiver, service
from tests.processes import GatewayThread


def accept(path: str, n: int) -> tuple[int, dict[str, str]]:
    return 200, {}


async def _delivered(r, batch_id: str, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        attempts = F.webhook_attempts(await asyncio.to_thread(r.hgetall, K.batch_key(batch_id)))
        if attempts and attempts[-1]["outcome"] != "retry":
            return attempts
        await asyncio.sleep(0.05)
    raise AssertionError(f"the webhook of {batch_id} was not delivered")


async def test_batch_end_is_announced_once(redis_url, default_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("TOKENQ_WEBHOOK_ALLOW", ALLOW)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    secret = new_secret()
    r.hset(keys.tenant_key("default"), SECRET_FIELD, secret)
    with Receiver(secret, accept) as rx, GatewayThread(redis_url) as url, \
            ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.05, capacity=2), \
            ThreadedFeeder(redis_url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with service(redis_url):
            f = await asyncio.to_thread(upload, client, chat_lines(3, MODEL))
            done = await asyncio.to_thread(
                client.batches.create, input_file_id=f.id, endpoint="/v1/chat/completions",
                completion_window="24h", metadata={"webhook_url": rx.url("/mine")})
            await asyncio.to_thread(wait_batch, client, done.id)
            # No URL of its own: the tenant's configured one.
            r.hset(keys.tenant_key("default"), "webhook_url", rx.url("/tenant"))
            big = await asyncio.to_thread(upload, client, chat_lines(40, MODEL, max_tokens=20, words=20))
            cancelled = await asyncio.to_thread(
                client.batches.create, input_file_id=big.id, endpoint="/v1/chat/completions",
                completion_window="24h")
            await asyncio.to_thread(wait_batch, client, cancelled.id, 60, ("in_progress",))
            await asyncio.to_thread(client.batches.cancel, cancelled.id)
            await asyncio.to_thread(wait_batch, client, cancelled.id)
            failed = await asyncio.to_thread(client.batches.create, input_file_id=f.id,
                                             endpoint="/v1/completions", completion_window="24h")
            for batch in (done, cancelled, failed):
                assert [a["outcome"] for a in await _delivered(r, batch.id)] == ["delivered"]
            await asyncio.sleep(0.5)
    events = {a["event"]["data"]["id"]: (a["headers"], a["event"]) for a in rx.accepted}
    assert len(rx.requests) == 3 and set(events) == {done.id, cancelled.id, failed.id}
    headers, event = events[done.id]
    assert headers["webhook-id"] == f"msg_{done.id}"
    assert event["type"] == "batch.completed" and event["data"]["request_counts"]["completed"] == 3
    assert event["data"]["output_file_id"]
    assert events[cancelled.id][1]["type"] == "batch.cancelled"
    assert events[failed.id][1]["type"] == "batch.failed"
    errors = events[failed.id][1]["data"]["errors"]  # the receiver learns why without a GET
    assert errors["object"] == "list" and errors["data"] and errors["data"][0]["message"]
    assert events[done.id][1]["data"]["errors"] is None
    paths = {r_["headers"]["webhook-id"]: r_["path"] for r_ in rx.requests}
    assert paths == {f"msg_{done.id}": "/mine", f"msg_{cancelled.id}": "/tenant", f"msg_{failed.id}": "/tenant"}


def test_an_unsafe_webhook_url_is_refused_at_creation(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        f = upload(client, chat_lines(1, MODEL))
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"webhook_url": "http://127.0.0.1:9/hook"})
        assert "webhook_url" in e.value.message
