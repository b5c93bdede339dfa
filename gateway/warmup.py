"""Keeps a gateway process ready for a request at any time, so that no request pays for what the process
would otherwise do on first use or after a quiet spell:

- anyio's asyncio backend, which anyio imports the first time a task group is made: an SSE response makes
  one, and the import took ~10 ms on a small CPU, on the first streamed request of every process;
- each served model's card, whose tokenizer takes ~0.1 s to build;
- the reads that the request path caches (whether auth is on, the default tenant's limits, the live
  workers), which a request after a quiet minute would otherwise wait for, as the
  first request of a process did (~1.4 ms in all on that CPU);
- the submission path's Redis connection;
- the semantic cache's model and index, once Redis holds semantic entries (seconds of loading that the
  first semantic request of the process would otherwise wait for).

The gateway runs `warm_before_serving` before it takes requests, then `keep_warm` every WARM_S, less than
the caches' stale windows, so a request finds each answer cached and at most a background read renews it.
Whether auth is on has no stale window (it must not lag): the warm-up reads it anew each time, and WARM_S is
less than auth's CACHE_S, so a request never waits for that read either.
Warming before serving also means no request joins a warm-up read that was sent before the request's
caller changed something (created an API key, say) and so answers with the older state."""

from __future__ import annotations

import asyncio
import time

import anyio

from gateway.auth import DEFAULT_TENANT
from gateway.context import GatewayContext
from protocol.outage import REDIS_DOWN, Outage
from tokenq.logs import get_logger

log = get_logger(__name__)

WARM_S = 0.8
START_TIMEOUT_S = 5.0


async def warm_once(ctx: GatewayContext) -> None:
    async with anyio.create_task_group():
        pass
    if not await ctx.auth.renew_auth_on():
        await ctx.auth.tenant(DEFAULT_TENANT)
    read_at = time.monotonic()
    models = await ctx.registry.models()
    ctx.registry.keep_live(models, read_at)  # serving() answers from this read, not one more
    for model in models:
        await ctx.registry.prompt_builder(model)
    await ctx.pipe.execute("PING")
    await ctx.cache.preload()


async def warm_before_serving(ctx: GatewayContext, timeout_s: float = START_TIMEOUT_S) -> None:
    """`warm_once`, given at most `timeout_s`: a gateway whose Redis is away or slow still starts and
    answers (its requests report the trouble)."""
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: 3.11's can swallow a cancellation
            await warm_once(ctx)
    except Exception as e:  # noqa: BLE001 - Redis away, a bad card, too slow: a request will say so
        log.warning("warm-up before serving failed", error=repr(e))


async def keep_warm(ctx: GatewayContext, every_s: float = WARM_S) -> None:
    """`warm_once` every `every_s` (the first after one wait), until cancelled. A Redis outage is logged
    here, once when it starts and once when it ends (requests meanwhile get 503s, logged at debug)."""
    outage = Outage(log, "gateway")
    while True:
        await asyncio.sleep(every_s)
        try:
            await warm_once(ctx)
            outage.restored()
        except REDIS_DOWN as e:
            outage.lost(e)
        except Exception as e:  # noqa: BLE001 - a bad card: a request will say so
            log.debug("warm-up failed", error=repr(e))
