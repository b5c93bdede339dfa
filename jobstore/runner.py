"""Sending the scripts: by SHA1 alone, and the source again only when Redis answers NOSCRIPT.

A redis-py pipeline holding a registered Script first asks Redis SCRIPT EXISTS for it: one more round trip
on every execute. Here a pipeline carries a bare EVALSHA; a Redis that has not seen the scripts (fresh, or
restarted) answers NOSCRIPT, and `pipeline` then loads every script at once and sends the pipeline again.
A process's shared auto-pipelined connection (jobstore/pipe.py) has its own `evalsha(script, keys,
args)`; `run` uses it when given one.

On a Redis Cluster each script goes to the node of its keys' slot (every key of one call shares a hash
tag: protocol/keys.py) and publishes with SPUBLISH (`Script.sharded`); redis-py's cluster pipeline carries
no scripts, so `pipeline` sends its calls one after another, in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from jobstore.scripts import ALL, Script

Arg = str | bytes | int | float


class ScriptClient(Protocol):
    """A client with its own way of sending a script (jobstore/pipe.RedisPipe)."""

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any: ...


class _Calls:
    """What `fill` queues when the pipeline is a cluster's: script calls, sent one by one."""

    def __init__(self) -> None:
        self.calls: list[tuple[Script, Sequence[str], Sequence[Arg]]] = []


async def run(client: Redis | RedisCluster | ScriptClient, script: Script, keys: Sequence[str],
              args: Sequence[Arg]) -> Any:
    """One script call on either client."""
    if isinstance(client, RedisCluster):
        script = script.sharded
    elif not isinstance(client, Redis):
        return await client.evalsha(script, keys, args)
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.lua, len(keys), *keys, *args)


def queue(pipe: Pipeline | _Calls, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> None:
    if isinstance(pipe, _Calls):
        pipe.calls.append((script, keys, args))
    else:
        pipe.evalsha(script.sha, len(keys), *keys, *args)


async def pipeline(redis: Redis | RedisCluster, fill: Callable[[Any], None], transaction: bool = False,
                   raise_on_error: bool = True) -> list:
    """The replies of a pipeline that `fill` queues. After a NOSCRIPT no script of the pipeline ran (they
    are all loaded together, and a MULTI runs against one script cache), so it is built and sent once more
    with the scripts loaded; its other commands must bear running twice. A second NOSCRIPT is raised.
    On a cluster the calls go one by one (each loads its script itself when needed)."""
    if isinstance(redis, RedisCluster):
        return await _one_by_one(redis, fill, raise_on_error)
    for attempt in range(2):
        pipe = redis.pipeline(transaction=transaction)
        fill(pipe)
        replies = await pipe.execute(raise_on_error=False)
        lost = next((r for r in replies if isinstance(r, NoScriptError)), None)
        if lost is None:
            break
        if attempt:
            raise lost
        for script in ALL:
            await redis.script_load(script.lua)
    if raise_on_error:
        error = next((r for r in replies if isinstance(r, Exception)), None)
        if error is not None:
            raise error
    return replies


async def _one_by_one(redis: RedisCluster, fill: Callable[[Any], None], raise_on_error: bool) -> list:
    calls = _Calls()
    fill(calls)
    replies: list = []
    for script, keys, args in calls.calls:
        try:
            replies.append(await run(redis, script, keys, args))
        except Exception as e:  # noqa: BLE001 (handed back in its place, as a pipeline does)
            if raise_on_error:
                raise
            replies.append(e)
    return replies
