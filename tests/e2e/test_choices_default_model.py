"""n = 4 choices with the real default model on the CPU: the engine runs them on one copy of the prompt's
KV blocks, and through the gateway and the worker they come back as 4 choices that a seed reproduces."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from protocol.sampling import SamplingParams

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = ("Write one sentence about the sea, then one about the mountains, then one about a city you "
            "would like to visit one day, and say why you would like to go there.")


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    return LLMEngine(default_model_dir, EngineConfig(num_kv_blocks=256, max_model_len=512))


def test_four_choices_share_one_prompt_in_the_kv_cache(engine):
    bm = engine.block_manager
    prompt = engine.tokenizer.encode(QUESTION * 3).ids
    engine.add_request("r", prompt, SamplingParams(n=4, max_tokens=8, temperature=0.8, seed=1, ignore_eos=True))
    peak = 0
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
    shared = (len(prompt) - 1) // bm.block_size
    tail = bm.blocks_needed(len(prompt) + 8) - shared
    assert peak == shared + 4 * tail, (peak, shared, tail)
    assert 4 * bm.blocks_needed(len(prompt)) > peak + 2 * shared  # far from 4 prompts' worth
    assert sorted(o.index for o in outs if o.finished) == [0, 1, 2, 3]


async def test_chat_with_n_4_gives_4_choices_a_seed_reproduces(redis_url, redis_client, engine):
    from gateway.app import create_app
    from worker.service import WorkerService

    service = WorkerService(redis_url, MODEL, engine, engine.model_card(MODEL), worker_id="smol:1", block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    app = create_app(redis_url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "n": 4, "seed": 1234,
            "temperature": 0.9, "max_tokens": 24}
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                         timeout=300) as c:
                for _ in range(600):
                    if (await c.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                first = await c.post("/v1/chat/completions", json=body)
                again = await c.post("/v1/chat/completions", json=body)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert first.status_code == 200, first.text
    choices = first.json()["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2, 3]
    texts = [ch["message"]["content"] for ch in choices]
    assert all(texts) and len(set(texts)) > 1, texts
    assert texts == [ch["message"]["content"] for ch in again.json()["choices"]]
    # Usage sums the choices: more than one choice's max_tokens can hold.
    assert 24 < first.json()["usage"]["completion_tokens"] <= 4 * 24
