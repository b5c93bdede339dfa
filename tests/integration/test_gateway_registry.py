"""The gateway's model-card cache: a card in hand keeps answering past its recheck time while a background
read rechecks it, by the digest the worker writes beside it (not the megabytes of the card itself)."""

from __future__ import annotations

import asyncio

from gateway import registry as registry_mod
from gateway.registry import Registry
from protocol import keys
from tests.fakes import FakeEngine
from tests.integration.fake_worker import MODEL, model_card
from tests.integration.test_worker_service import CARD
from worker.engine_loop import EngineLoop
from worker.heartbeat import Heartbeat


async def test_worker_writes_the_card_digest(redis_client):
    await Heartbeat(redis_client, "hb:1", CARD, EngineLoop(FakeEngine()), capacity=4).start()
    raw = CARD.model_dump_json()
    assert await redis_client.hmget(keys.model_card_key(CARD.name), ["card", "digest"]) == [raw, CARD.digest()]


async def test_a_restarted_worker_keeps_the_digest_the_response_cache_keys_on(redis_client, default_model_dir):
    """Its card differs only in `created`: every cached answer of the model must keep answering."""
    card = model_card(default_model_dir, 2048)
    reg = Registry(redis_client)
    await Heartbeat(redis_client, "hb:1", card, EngineLoop(FakeEngine()), capacity=4).start()
    assert await reg.prompt_builder(MODEL) is not None
    before = reg.card_digest(MODEL)
    restarted = card.model_copy(update={"created": card.created + 3600})
    await Heartbeat(redis_client, "hb:2", restarted, EngineLoop(FakeEngine()), capacity=4).start()
    fresh = Registry(redis_client)  # another gateway, or this one after its recheck
    assert (await fresh.prompt_builder(MODEL)).card.created == restarted.created
    assert fresh.card_digest(MODEL) == before
    assert card.model_copy(update={"engine": "other weights"}).digest() != before


async def _write(redis, card) -> None:
    await redis.hset(keys.model_card_key(card.name), mapping={"card": card.model_dump_json(), "digest": card.digest()})


async def test_stale_card_answers_while_rechecked(redis_client, default_model_dir, monkeypatch):
    r = redis_client
    first = model_card(default_model_dir, 2048)
    await _write(r, first)
    reg = Registry(r)
    reads: list[str] = []
    hget = r.hget

    hmget = r.hmget

    async def counting_hget(key, field):
        reads.append(field)
        return await hget(key, field)

    async def counting_hmget(key, fields):
        reads.append("+".join(fields))
        return await hmget(key, fields)

    monkeypatch.setattr(reg, "redis", type("Spy", (), {"hget": staticmethod(counting_hget),
                                                       "hmget": staticmethod(counting_hmget)})())
    assert (await reg.prompt_builder(MODEL)).card.max_model_len == 2048
    assert reads == ["card+digest"]

    monkeypatch.setattr(registry_mod, "CARD_RECHECK_S", 0.0)  # every call is past the recheck time
    held = await reg.prompt_builder(MODEL)
    await asyncio.sleep(0.1)
    assert reads == ["card+digest", "digest"]  # unchanged: the digest alone was read
    assert await reg.prompt_builder(MODEL) is held
    await asyncio.sleep(0.1)  # the recheck that call started

    await _write(r, first.model_copy(update={"max_model_len": 4096}))
    reads.clear()
    assert (await reg.prompt_builder(MODEL)) is held  # answers at once with the card in hand
    for _ in range(50):
        await asyncio.sleep(0.02)
        if (await reg.prompt_builder(MODEL)).card.max_model_len == 4096:
            break
    assert (await reg.prompt_builder(MODEL)).card.max_model_len == 4096
    assert reads[:2] == ["digest", "card+digest"]


async def test_gateway_loads_served_cards_before_the_first_request(redis_url, redis_client, default_model_dir):
    from gateway.app import create_app
    from tests.integration.test_gateway_fastpath import register_worker

    await register_worker(redis_client, default_model_dir)
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        registry = app.state.ctx.registry
        for _ in range(100):
            if MODEL in registry._cards:
                break
            await asyncio.sleep(0.02)
        assert MODEL in registry._cards  # no request asked for it


async def test_a_worker_with_another_card_replaces_the_gateways_card_at_once(redis_client, default_model_dir):
    """A worker of the same model name with other weights or a shorter context came up: for CARD_RECHECK_S
    the gateway counted prompts against the old context (a too-long prompt failed at the worker with a 500)
    and answered from the old weights' cache entries. The new worker's heartbeat names its card's digest."""
    old = model_card(default_model_dir, 2048)
    reg = Registry(redis_client)
    first = Heartbeat(redis_client, "hb:1", old, EngineLoop(FakeEngine()), capacity=4)
    await first.start()
    assert (await reg.target(MODEL)).max_model_len == 2048
    old_digest = reg.card_digest(MODEL)
    await redis_client.delete(keys.worker_key("hb:1"))  # that worker stopped
    new = old.model_copy(update={"max_model_len": 256})
    await Heartbeat(redis_client, "hb:2", new, EngineLoop(FakeEngine()), capacity=4).start()
    reg._live = None  # the live workers as the next read (within LIVE_RECHECK_S) sees them
    target = await reg.target(MODEL)
    assert target.max_model_len == 256 and reg.card_digest(MODEL) == new.digest() != old_digest
    assert [w.card_digest for w in target.workers] == [new.digest()]


async def test_a_card_no_worker_serves_stays_while_its_workers_are_away(redis_client, default_model_dir):
    card = model_card(default_model_dir, 2048)
    reg = Registry(redis_client)
    await Heartbeat(redis_client, "hb:1", card, EngineLoop(FakeEngine()), capacity=4).start()
    await reg.target(MODEL)
    await redis_client.delete(keys.worker_key("hb:1"))
    reg._live = None
    target = await reg.target(MODEL)  # queued jobs wait for the next worker, counted against this card
    assert target.workers == [] and reg.card_digest(MODEL) == card.digest()
