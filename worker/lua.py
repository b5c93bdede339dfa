"""Lua scripts that the worker queues in redis-py pipelines, sent by their SHA1 alone.

A redis-py pipeline holding a registered Script first asks Redis SCRIPT EXISTS for it: one more round trip
on every execute, and the worker executes such a pipeline when a job starts and with each job's first
token. Here a pipeline carries a bare EVALSHA. A Redis that has not seen the scripts (fresh, or restarted)
answers NOSCRIPT; `execute` then loads every script of the worker at once and sends the pipeline again."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from protocol.scripts import Script

_ALL: list[PipelinedScript] = []  # every script of the worker: loaded together, so none is present alone


class PipelinedScript(Script):
    """A worker script: registered with the others, so that a NOSCRIPT reloads them all together."""

    def __init__(self, lua: str) -> None:
        super().__init__(lua)
        _ALL.append(self)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[str | int | float]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def execute(redis: Redis, fill: Callable[[Pipeline], None], transaction: bool = False,
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
        for script in _ALL:
            await redis.script_load(script.lua)
    if raise_on_error:
        error = next((r for r in replies if isinstance(r, Exception)), None)
        if error is not None:
            raise error
    return replies
