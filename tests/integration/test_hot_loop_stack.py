"""TOKENQ_HOT_LOOP=1: the gateway and the worker each run a hot loop (protocol/hot_loop.py), and a streamed
completion through them is the same as one without. Gateway, worker and the real engine on a tiny random
model, in one process."""

from __future__ import annotations

import asyncio
import json

from tests.integration.engine_stack import gateway_with_engine
from worker.engine.config import EngineConfig
from worker.models.random_weights import write_random_model_dir

CONFIG = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=256)
BODY = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "stream": True}


def hot_loops() -> int:
    return sum(t.get_name() == "hot-loop" and not t.done() for t in asyncio.all_tasks())


async def test_a_stream_through_hot_loops_is_the_same(redis_url, redis_client, tmp_path, monkeypatch):
    model_dir = write_random_model_dir("tiny", tmp_path / "tiny")
    streams, loops = [], []
    for hot in ("0", "1"):
        monkeypatch.setenv("TOKENQ_HOT_LOOP", hot)
        async with gateway_with_engine(redis_url, model_dir, CONFIG) as client:
            loops.append(hot_loops())
            r = await client.post("/v1/completions", json=BODY)
            assert r.status_code == 200, r.text
            chunks = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            streams.append("".join(c["choices"][0]["text"] for c in chunks if c["choices"]))
    assert loops == [0, 2]  # the gateway's and the worker's
    assert len(streams[0].split()) == 8 and streams[0] == streams[1]
