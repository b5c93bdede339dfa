"""The gateway's event hub on its own pub/sub connection, and on redis-py's PubSub where it has none (TLS, a
Unix socket): messages in order to every follower, and a lost connection told to each of them."""

from __future__ import annotations

import socket

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.event_hub import EventHub
from jobstore.pipe import KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES


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


async def test_its_own_connection_probes_a_silent_peer_within_a_minute(redis_client):
    """The hub's connection sends no PING of its own: TCP keepalive, tightened, stands for redis-py's health
    checks, so a peer gone silently is noticed after about a minute rather than the system's two hours."""
    hub = _hub(redis_client, True)
    try:
        async with hub.join("ch:a"):
            sock = hub._conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                probes = (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                          sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                          sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
                assert probes == (KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES)
                assert KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES <= 60
    finally:
        await hub.aclose()
