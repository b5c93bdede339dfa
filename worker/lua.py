"""Lua scripts that the worker queues in redis-py pipelines, sent by their SHA1 alone.

A redis-py pipeline holding a registered Script first asks Redis SCRIPT EXISTS for it: one more round trip
on every execute, and the worker executes such a pipeline when a job starts and with each job's first
token. Here a pipeline carries a bare EVALSHA. The scripts are loaded when the worker starts; a Redis that
restarted since (and forgot them) answers NOSCRIPT, after which `load` gives them again and the caller
sends again."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline


class PipelinedScript:
    def __init__(self, lua: str) -> None:
        self.lua = lua
        self.sha = hashlib.sha1(lua.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[str | int | float]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def load(redis: Redis, *scripts: PipelinedScript) -> None:
    for script in scripts:
        await redis.script_load(script.lua)
