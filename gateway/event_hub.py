"""One pub/sub connection per gateway process for every job it follows. Each follower joins its job's
channel here; the hub subscribes to a channel on its first follower and unsubscribes after its last, and
each message goes out to the followers' queues. Waiting requests then cost Redis no connection of their
own: a few hundred waiting or streaming clients are one Redis client, not hundreds (a Redis at
`maxclients` would stop the whole gateway).

The connection is the hub's own (jobstore/pipe.py's protocol): a message is handed to its followers as it
is parsed, with no reader task and no redis-py command path between Redis and a streamed token, which
cost a measurable part of a first token's way to the client (docs/BENCHMARKS.md). Where that connection
cannot be had (TLS, a Unix socket) the hub reads redis-py's PubSub in a task of its own instead.

A follower still needs its subscription to be live before it reads the job's snapshot: `join` returns
once Redis has confirmed a SUBSCRIBE of this channel. When the
connection is lost, every follower gets the error and joins again (jobs.follow re-reads the snapshot).

On a Redis Cluster the jobs' channels are shard channels (SPUBLISH): `ShardedEventHub` keeps one hub per
node, each on one SSUBSCRIBE connection to that node, and sends each channel to the hub of its slot's node.
A slot that moves ends its node's subscriptions (SUNSUBSCRIBE from the server): followers join again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from jobstore.pipe import Endpoint, RespProtocol
from tokenq.logs import detached, get_logger

SUBSCRIBE_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 1.0
log = get_logger(__name__)


class Subscription:
    """One follower's view of a channel: its messages, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | BaseException] = asyncio.Queue()

    async def get(self, timeout: float) -> str | None:
        """The next message's data, or None after `timeout` seconds of silence. Raises ConnectionError when
        the hub's connection was lost (what was published meanwhile is gone: re-read the snapshot).
        asyncio.timeout, not wait_for: on 3.11 wait_for runs the get in a task of its own, one more task and
        loop turn between a message and the stream it goes to."""
        if self.queue.empty():
            try:
                async with asyncio.timeout(timeout):
                    item = await self.queue.get()
            except TimeoutError:
                return None
        else:
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            raise RedisConnectionError(f"pub/sub connection lost: {item!r}") from item
        return item


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _Subscriber(RespProtocol):
    """The hub's connection: past its setup (AUTH, SELECT), every reply is a push (a confirmation or a
    message), handed to `on_push` as it is parsed; `on_lost` hears of its end once."""

    def __init__(self, on_push: Callable[[_Subscriber, Any], None],
                 on_lost: Callable[[_Subscriber, BaseException], None]) -> None:
        super().__init__()
        self.on_push = on_push
        self.on_lost = on_lost

    def reply(self, reply: Any) -> None:
        if self.waiting:
            super().reply(reply)
        else:
            self.on_push(self, reply)

    def _fail(self, error: RedisConnectionError) -> None:
        first = self.lost is None
        super()._fail(error)
        if first:
            self.on_lost(self, self.lost or error)

    def write(self, *args: str) -> None:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self.transport.write(hiredis.pack_command(args))


HubConnection = _Subscriber | PubSub


class EventHub:
    """`sharded`: subscribe with SSUBSCRIBE (a cluster node's shard channels) instead of SUBSCRIBE."""

    def __init__(self, redis: aioredis.Redis, sharded: bool = False) -> None:
        self.redis = redis
        self.sharded = sharded
        # The types of the replies that confirm a subscription and that carry a message.
        self._confirmed, self._message = ("ssubscribe", "smessage") if sharded else ("subscribe", "message")
        self._endpoint = Endpoint.of(redis)  # None: redis-py's PubSub and a reader task
        self._conn: HubConnection | None = None
        self._reader: asyncio.Task | None = None
        self._followers: dict[str, set[Subscription]] = {}
        self._live: dict[str, asyncio.Future] = {}  # channel -> confirmation of its current SUBSCRIBE
        self._pending: dict[str, list[asyncio.Future]] = {}  # SUBSCRIBEs sent and not yet confirmed
        self._lock = asyncio.Lock()  # one SUBSCRIBE or UNSUBSCRIBE written at a time
        self._unsubscribing: set[asyncio.Task] = set()
        self._losing: set[asyncio.Task] = set()
        self.on_join: Callable[[], None] | None = None  # a follower joined (protocol/hot_loop.py's poke)

    @property
    def channels(self) -> int:
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def join(self, channel: str) -> AsyncIterator[Subscription]:
        """Follow `channel` for the `async with` block; the subscription is live on entry."""
        sub = Subscription()
        if self.on_join is not None:
            self.on_join()
        confirmed = await self._add(channel, sub)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_S)
            yield sub
        finally:
            await self._remove(channel, sub)

    async def _add(self, channel: str, sub: Subscription) -> asyncio.Future:
        async with self._lock:
            followers = self._followers.setdefault(channel, set())
            followers.add(sub)
            if channel in self._live:
                return self._live[channel]
            confirmed = asyncio.get_running_loop().create_future()
            confirmed.add_done_callback(_retrieve)  # a follower that gave up is not told: no "never retrieved"
            self._live[channel] = confirmed
            self._pending.setdefault(channel, []).append(confirmed)
            try:
                await self._subscribe(channel)
            except BaseException:
                self._forget(channel, sub)
                pending = self._pending.get(channel, [])
                if confirmed in pending:
                    pending.remove(confirmed)
                if not pending:
                    self._pending.pop(channel, None)
                raise
            return confirmed

    async def _subscribe(self, channel: str) -> None:
        if self._endpoint is not None:
            if self._conn is None:
                self._conn = await self._endpoint.open(lambda: _Subscriber(self._on_push, self._on_lost),
                                                       SUBSCRIBE_TIMEOUT_S)
            assert isinstance(self._conn, _Subscriber)
            self._conn.write("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", channel)
            return
        if self._conn is None:
            self._conn = self.redis.pubsub()
        assert isinstance(self._conn, PubSub)
        if self.sharded:  # redis-py 5's asyncio PubSub has no ssubscribe()
            await self._conn.execute_command("SSUBSCRIBE", channel)
        else:
            await self._conn.subscribe(channel)
        if self._reader is None or self._reader.done():
            self._reader = detached(self._read(self._conn), name="event-hub")

    async def _remove(self, channel: str, sub: Subscription) -> None:
        """Forget the follower at once (its task may be being cancelled); UNSUBSCRIBE in the background
        after the channel's last one, unless another follower has joined it meanwhile."""
        if self._forget(channel, sub):
            task = detached(self._unsubscribe(channel))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, channel: str) -> None:
        async with self._lock:
            conn = self._conn
            if channel in self._followers or conn is None:
                return
            with contextlib.suppress(Exception):  # a lost connection drops the subscription anyway
                command = "SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE"
                if isinstance(conn, _Subscriber):
                    conn.write(command, channel)
                elif self.sharded:
                    await conn.execute_command(command, channel)
                else:
                    await conn.unsubscribe(channel)

    def _forget(self, channel: str, sub: Subscription) -> bool:
        """Drop one follower; True when it was the channel's last."""
        followers = self._followers.get(channel)
        if followers is None or sub not in followers:
            return False
        followers.discard(sub)
        if followers:
            return False
        del self._followers[channel]
        self._live.pop(channel, None)
        return True

    def _handle(self, kind: str, channel: str, data: Any) -> bool:
        """One push from Redis; False when it ends the connection's use (a followed shard channel moved)."""
        if kind == self._message:
            for sub in self._followers.get(channel, ()):
                sub.queue.put_nowait(data)
        elif kind == self._confirmed:  # the channel is live: every SUBSCRIBE of it sent so far is done
            for future in self._pending.pop(channel, ()):
                if not future.done():
                    future.set_result(None)
        elif kind == "sunsubscribe" and channel in self._followers:  # the server dropped it: slot moved
            return False
        return True

    def _on_push(self, conn: _Subscriber, reply: Any) -> None:
        if isinstance(reply, BaseException):  # Redis refused a command: start again on a new connection
            self._on_lost(conn, reply)
        elif isinstance(reply, list) and len(reply) == 3 and not self._handle(*reply):
            self._on_lost(conn, RedisConnectionError(f"shard channel {reply[1]} moved"))

    def _on_lost(self, conn: _Subscriber, error: BaseException) -> None:
        if conn is self._conn:  # not one closed on purpose
            task = detached(self._lost(conn, error))
            self._losing.add(task)
            task.add_done_callback(self._losing.discard)

    async def _read(self, pubsub: PubSub) -> None:
        """redis-py's PubSub, where the hub has no connection of its own."""
        while True:
            try:
                message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every follower is told and joins again
                await self._lost(pubsub, e)
                return
            if message is None:
                continue
            if not self._handle(message.get("type"), message.get("channel"), message.get("data")):
                await self._lost(pubsub, RedisConnectionError(f"shard channel {message.get('channel')} moved"))
                return

    async def _lost(self, conn: HubConnection, error: BaseException) -> None:
        log.warning("event hub lost its pub/sub connection; followers re-subscribe", error=repr(error),
                    channels=len(self._followers))
        async with self._lock:
            if self._conn is conn:
                self._conn = None
            for followers in self._followers.values():
                for sub in followers:
                    sub.queue.put_nowait(error)
            for pending in self._pending.values():
                for future in pending:
                    if not future.done():
                        future.set_exception(RedisConnectionError(f"pub/sub connection lost: {error!r}"))
            self._followers.clear()
            self._live.clear()
            self._pending.clear()
        await _close(conn)

    async def aclose(self) -> None:
        await asyncio.gather(*self._unsubscribing, *self._losing, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


async def _close(conn: HubConnection) -> None:
    with contextlib.suppress(Exception):
        if isinstance(conn, _Subscriber):
            if conn.transport is not None:
                conn.transport.close()
        else:
            await conn.aclose()


class ShardedEventHub:
    """One EventHub a cluster node, each on SSUBSCRIBE; `join` picks the node that owns the channel's slot."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._hubs: dict[str, EventHub] = {}
        self.on_join: Callable[[], None] | None = None  # as EventHub's

    @property
    def channels(self) -> int:
        return sum(hub.channels for hub in self._hubs.values())

    def join(self, channel: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        if self.on_join is not None:
            self.on_join()
        return self._hub(channel).join(channel)

    def _hub(self, channel: str) -> EventHub:
        node = self.cluster.get_node_from_key(channel)
        hub = self._hubs.get(node.name)
        if hub is None:
            kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _NODE_KWARGS}
            client = aioredis.Redis(host=node.host, port=node.port, decode_responses=True, **kwargs)
            hub = self._hubs[node.name] = EventHub(client, sharded=True)
        return hub

    async def aclose(self) -> None:
        for hub in self._hubs.values():
            await hub.aclose()
            await hub.redis.aclose()
        self._hubs.clear()


# What a node's pub/sub connection takes over from the cluster client's connections.
_NODE_KWARGS = frozenset({"username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                          "ssl_cert_reqs", "socket_connect_timeout", "socket_keepalive"})


Hub = EventHub | ShardedEventHub


def event_hub(redis: aioredis.Redis | RedisCluster) -> Hub:
    """The hub for this client: sharded on a cluster, one plain pub/sub connection on a single node."""
    return ShardedEventHub(redis) if isinstance(redis, RedisCluster) else EventHub(redis)
