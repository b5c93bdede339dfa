"""One Redis connection shared by a process's hot script calls (auto-pipelining): the gateway's submissions
and the worker's stream deltas. A command on an idle connection goes out at once (a lone submission or delta
waits for no loop iteration); the commands issued while replies are awaited go out together at the end of
the loop iteration, and the replies come back in order. It skips what makes a redis-py command cost CPU
(pool checkout, retry wrapper, packing in Python), and concurrent calls are written to Redis together
(group commit) instead of one system call each.

Errors behave as with the caller's redis-py client (its retries and connect timeout are passed in): a lost
connection is retried with back-off, then raises redis's ConnectionError (the gateway's 503). A command
whose reply was lost may have run, so a retry can run it twice, as redis-py's retries can: the submit
script then adds nothing, and admission takes its own Idempotency-Key for an admission (a rate counter may
be charged twice); the delta script skips a delta whose seq the job has already."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from jobstore.connect import AnyRedis, is_cluster
from jobstore.scripts import Script

Arg = str | bytes | int | float


class RespProtocol(asyncio.Protocol):
    """One connection: a command on an idle connection is written at once, those sent while others await
    their replies go out in one write at the end of the loop iteration; each reply answers the oldest
    command waiting (the gateway's event hub takes its pushes instead: `reply`)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.lost: RedisConnectionError | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                self.reply(reply)
        except (hiredis.ProtocolError, IndexError) as e:  # garbage, or a reply nobody asked for
            self._fail(RedisConnectionError(f"Redis protocol error: {e!r}"))

    def reply(self, reply: Any) -> None:
        """One reply, to the oldest command waiting for one (IndexError: none is)."""
        future = self.waiting.popleft()
        if not future.done():
            future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc!r}"))

    def _fail(self, error: RedisConnectionError) -> None:
        self.lost = self.lost or error
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)
        if self.transport is not None:
            self.transport.close()

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise self.lost
        future = self.loop.create_future()
        if not self.waiting and self.transport is not None:  # idle: nothing to group it with
            self.transport.write(packed)
        else:
            if not self.out:
                self.loop.call_soon(self._flush)
            self.out.append(packed)
        self.waiting.append(future)
        return future

    def _flush(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        if self.lost is None and self.transport is not None:
            self.transport.write(data)


class RedisPipe:
    """`execute(*args)` and `evalsha(script, keys, args)` over the shared connection. For a Redis reached
    in a way this does not speak (TLS, a Unix socket) it passes the commands to the redis-py client."""

    def __init__(self, redis: AnyRedis, retries: int, connect_timeout_s: float, library: bool = False) -> None:
        """`library`: pass every command to the redis-py client (what `tokenq bench queue` compares). A
        cluster's commands too go through redis-py's client, which routes each to its slot's node."""
        self._endpoint = None if library else Endpoint.of(redis)
        self._fallback = redis if self._endpoint is None else None
        self._retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
        self._connect_timeout_s = connect_timeout_s
        self._proto: RespProtocol | None = None
        self._lock = asyncio.Lock()

    async def execute(self, *args: Arg) -> Any:
        if self._fallback is not None:
            return await self._fallback.execute_command(*args)
        proto = self._proto
        if proto is not None and proto.lost is None:  # connected: no retry wrapper on the hot path
            try:
                return _checked(await proto.send(hiredis.pack_command(args)))
            except RedisConnectionError:
                pass  # retried below, as redis-py retries
        return await self._retry.call_with_retry(lambda: self._once(args), _no_op)

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed Redis; EVAL caches it again
            return await self.execute("EVAL", script.lua, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    async def _once(self, args: Sequence[Arg]) -> Any:
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._connect()
        return _checked(await proto.send(hiredis.pack_command(tuple(args))))

    async def _connect(self) -> RespProtocol:
        async with self._lock:
            if self._proto is None or self._proto.lost is not None:
                self._proto = await self._open()
            return self._proto

    async def _open(self) -> RespProtocol:
        assert self._endpoint is not None
        return await self._endpoint.open(RespProtocol, self._connect_timeout_s)


P = TypeVar("P", bound=RespProtocol)


@dataclass(frozen=True)
class Endpoint:
    """Where a connection of our own reaches a redis-py client's Redis, and what it sends first (AUTH,
    SELECT)."""

    address: tuple[str, int]
    setup: tuple[tuple[Arg, ...], ...]

    @classmethod
    def of(cls, redis: AnyRedis) -> Endpoint | None:
        """None where the client reaches Redis in a way this does not speak: a cluster, TLS, a Unix socket."""
        if is_cluster(redis) or redis.connection_pool.connection_class is not Connection:
            return None
        kw = redis.connection_pool.connection_kwargs
        setup: list[tuple[Arg, ...]] = []
        if kw.get("password"):
            setup.append(("AUTH", *([kw["username"]] if kw.get("username") else []), kw["password"]))
        if kw.get("db"):
            setup.append(("SELECT", kw["db"]))
        return cls((kw.get("host", "localhost"), int(kw.get("port", 6379))), tuple(setup))

    async def open(self, protocol: Callable[[], P], connect_timeout_s: float) -> P:
        """A connected protocol (keepalive on), the setup commands answered."""
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(protocol, *self.address), connect_timeout_s)
        except (TimeoutError, OSError) as e:
            raise RedisConnectionError(f"cannot connect to Redis at {self.address}: {e!r}") from e
        sock = proto.transport.get_extra_info("socket") if proto.transport else None
        if sock is not None:
            keep_alive(sock)
        for args in self.setup:
            reply = await proto.send(hiredis.pack_command(args))
            if isinstance(reply, ResponseError):
                refused = AuthenticationError if args[0] == "AUTH" else RedisConnectionError
                proto._fail(refused(f"Redis refused {args[0]}: {reply}"))
                raise proto.lost or reply
        return proto


# TCP keepalive of our connections: a peer gone silently (a host down, a NAT's entry dropped) is noticed after
# about a minute, as redis-py's clients notice it by their health-check PINGs (every 15-30 s here), rather than
# after the system's default two hours. A pub/sub connection may stay idle that long.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


def keep_alive(sock: socket.socket) -> None:
    """Keepalive on, with the probes above where the platform lets them be set (Linux, recent macOS)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _checked(reply: Any) -> Any:
    """The reply, or its error raised as redis-py would raise it (LOADING is retried, as a ConnectionError; a
password asked for or refused is an AuthenticationError)."""
    if isinstance(reply, ResponseError):
        code = str(reply).partition(" ")[0]
        raise {"LOADING": BusyLoadingError, "NOSCRIPT": NoScriptError, "OOM": OutOfMemoryError,
               "NOAUTH": AuthenticationError, "WRONGPASS": AuthenticationError}.get(code, ResponseError)(str(reply))
    return reply


async def _no_op(_: Exception) -> None:
    return None
