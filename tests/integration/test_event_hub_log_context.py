"""The event hub's connection is opened by whichever request follows a job first, and outlives it: when
it is lost, the line that says so names no job (it named that first request's)."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from gateway.event_hub import EventHub
from gateway.logging import bind_job


@pytest.mark.parametrize("own_connection", [True, False])
async def test_a_lost_connection_is_logged_without_the_first_requests_job(redis_client, own_connection):
    hub = EventHub(redis_client)
    if not own_connection:
        hub._endpoint = None  # redis-py's PubSub and a reader task, as for TLS or a Unix socket

    async def first_request() -> None:
        bind_job("job-of-the-first-request")
        async with hub.join("ch:a") as sub:
            await redis_client.client_kill_filter(_type="pubsub")
            with pytest.raises(RedisConnectionError):
                await sub.get(5)

    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
            await asyncio.create_task(first_request())
    finally:
        await hub.aclose()
    [lost] = [line for line in lines if line["event"].startswith("event hub lost")]
    assert "job_id" not in lost
