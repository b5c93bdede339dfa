"""The gateway's warm-up: after it, a request's cached reads (auth, tenant, live workers, the model's card,
queue depth) send nothing to Redis, and anyio's backend is imported before any SSE response needs it."""

from __future__ import annotations

import subprocess
import sys
import time

from gateway.app import create_app
from gateway.auth import CACHE_S
from gateway.context import GatewayContext
from gateway.metrics import GatewayMetrics
from gateway.warmup import START_TIMEOUT_S, WARM_S, warm_once
from tests.fakes import FakeEngine
from tests.integration.fake_worker import model_card
from worker.engine_loop import EngineLoop
from worker.heartbeat import Heartbeat


async def _commands(redis) -> int:
    """Commands Redis has run, less INFO (these counts)."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def _request_path_reads(ctx: GatewayContext, model: str) -> None:
    tenant = await ctx.auth.authenticate(None)
    assert await ctx.registry.prompt_builder(model) is not None
    assert await ctx.registry.serving(model)
    assert tenant is not None


async def test_after_warm_up_a_request_reads_nothing_from_redis(redis_client, default_model_dir):
    card = model_card(default_model_dir, 2048)
    await Heartbeat(redis_client, "hb:1", card, EngineLoop(FakeEngine()), capacity=4).start()
    cold = GatewayContext.build(redis_client, GatewayMetrics(), max_queue_depth=1000)
    before = await _commands(redis_client)
    await _request_path_reads(cold, card.name)
    assert await _commands(redis_client) - before > 3  # cold: auth, tenant, workers, card

    warm = GatewayContext.build(redis_client, GatewayMetrics(), max_queue_depth=1000)
    await warm_once(warm)
    before = await _commands(redis_client)
    await _request_path_reads(warm, card.name)
    assert await _commands(redis_client) - before == 0



async def test_a_request_between_warm_ups_never_waits_for_the_auth_flag(redis_client, monkeypatch):
    """Whether auth is on is cached CACHE_S with no stale window: each warm-up reads it anew, so a request
    just before the next warm-up still finds it cached (a warm-up that kept a young entry would let it
    expire in between, and that request would wait for two Redis reads)."""
    assert WARM_S < CACHE_S
    ctx = GatewayContext.build(redis_client, GatewayMetrics(), max_queue_depth=1000)
    reads: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr("gateway.flight._now", lambda: clock[0])
    read_auth = ctx.auth._read_auth

    async def counted() -> bool:
        reads.append(clock[0])
        return await read_auth()

    monkeypatch.setattr(ctx.auth, "_read_auth", counted)
    for warm_up in range(4):
        await warm_once(ctx)
        assert len(reads) == warm_up + 1
        clock[0] += WARM_S * 0.99  # the last moment before the next warm-up
        await ctx.auth.authenticate(None)
        assert len(reads) == warm_up + 1  # the request read nothing
        clock[0] += WARM_S * 0.01
    await ctx.pipe.aclose()


def test_warm_up_imports_anyios_backend():
    code = """
import asyncio, sys
from gateway import warmup

class Down:
    async def renew_auth_on(self):
        raise ConnectionError("redis is down")

assert "anyio._backends._asyncio" not in sys.modules
try:
    asyncio.run(warmup.warm_once(type("Ctx", (), {"auth": Down()})()))
except ConnectionError:
    pass
assert "anyio._backends._asyncio" in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_the_gateway_is_warm_before_it_serves(redis_client, redis_url, default_model_dir, monkeypatch):
    """No request races the first warm-up: its reads were all answered before the app took requests (a
    request that joined a read sent before its caller created an API key would be served as the default
    tenant). The expiry sweep, which reads Redis in the background and not for a request, is held off."""
    async def no_sweep(store) -> None:
        return None

    monkeypatch.setattr("gateway.app.sweep_forever", no_sweep)
    card = model_card(default_model_dir, 2048)
    await Heartbeat(redis_client, "hb:2", card, EngineLoop(FakeEngine()), capacity=4).start()
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        before = await _commands(redis_client)
        await _request_path_reads(ctx, card.name)
        assert await _commands(redis_client) - before == 0


async def test_a_gateway_starts_when_redis_is_away():
    app = create_app("redis://127.0.0.1:1")  # nothing listens there
    started = time.monotonic()
    async with app.router.lifespan_context(app):
        pass
    assert time.monotonic() - started < START_TIMEOUT_S + 1
