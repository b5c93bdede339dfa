"""The gateway's event hub on its own pub/sub connection, and on redis-py's PubSub where it has none (TLS, a
Unix socket): messages in order to every follower, and a lost connection told to each of them."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.event_hub import EventHub


def _hub(redis_client, own_connection: bool) -> EventHub:
    hub = EventHub(redis_client)
    if not own_connection:
        hub._endpoint = None  # as for a client this cannot speak for
    return hub


@pytest.mark.parametrize("own_connection", [True, False])
async def test_followers_get_every_message_in_order(redis_client, own_connection):
    hub = _hub(redis_client, own_connection)
    try:
        async with hub.join("ch:a") as a1, hub.join("ch:a") as a2, hub.join("ch:b") as b:
            for i in range(3):
                await redis_client.publish("ch:a", f"a{i}")
            await redis_client.publish("ch:b", "b0")
            assert [await a1.get(5) for _ in range(3)] == ["a0", "a1", "a2"]
            assert [await a2.get(5) for _ in range(3)] == ["a0", "a1", "a2"]
            assert await b.get(5) == "b0"
            assert hub.channels == 2
            pubsub = [c for c in await redis_client.client_list() if int(c.get("sub", 0)) > 0]
            assert len(pubsub) == 1  # one connection for every follower
    finally:
        await hub.aclose()


@pytest.mark.parametrize("own_connection", [True, False])
async def test_a_lost_connection_reaches_every_follower(redis_client, own_connection):
    hub = _hub(redis_client, own_connection)
    try:
        async with hub.join("ch:a") as a, hub.join("ch:b") as b:
            await redis_client.client_kill_filter(_type="pubsub")
            for sub in (a, b):
                with pytest.raises(RedisConnectionError):
                    await sub.get(5)
        async with hub.join("ch:a") as again:  # a new connection
            await redis_client.publish("ch:a", "after")
            assert await again.get(5) == "after"
    finally:
        await hub.aclose()
