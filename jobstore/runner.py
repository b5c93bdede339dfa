"""Sending the scripts: by SHA1 alone, and the source again only when Redis answers NOSCRIPT.

A redis-py pipeline holding a registered Script first asks Redis SCRIPT EXISTS for it: one more round trip
on every execute. Here a pipeline carries a bare EVALSHA; a Redis that has not seen the scripts (fresh, or
restarted) answers NOSCRIPT, and `pipeline` then loads every script at once and sends the pipeline again.
The gateway's shared auto-pipelined connection (gateway/redis_pipe.py) has its own `evalsha(script, keys,
args)`; `run` uses it when given one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from jobstore.scripts import ALL, Script

Arg = str | bytes | int | float


class ScriptClient(Protocol):
    """A client with its own way of sending a script (gateway/redis_pipe.RedisPipe)."""

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any: ...


async def run(client: Redis | ScriptClient, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
    """One script call on either client."""
    if not isinstance(client, Redis):
        return await client.evalsha(script, keys, args)
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.lua, len(keys), *keys, *args)


def queue(pipe: Pipeline, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> None:
    pipe.evalsha(script.sha, len(keys), *keys, *args)


async def pipeline(redis: Redis, fill: Callable[[Pipeline], None], transaction: bool = False,
                   raise_on_error: bool = True) -> list:
    """The replies of a pipeline that `fill` queues. After a NOSCRIPT no script of the pipeline ran (they
    are all loaded together, and a MULTI runs against one script cache), so it is built and sent once more
    with the scripts loaded; its other commands must bear running twice. A second NOSCRIPT is raised."""
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
