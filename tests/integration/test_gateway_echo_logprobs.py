"""/v1/completions with echo and logprobs, as OpenAI and vLLM answer it: the prompt's tokens carry their
logprobs (the first one null) with text offsets from the start, the generated ones follow from the end of
the prompt, and a stream carries the same logprobs in its chunks. Gateway, worker and the real engine on
a tiny random model."""

from __future__ import annotations

import json
import math

import pytest

from protocol.sampling import SamplingParams
from tests.integration.engine_stack import gateway_with_engine
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.random_weights import write_random_model_dir

MODEL = "tiny"
PROMPT = "t5 t6 t7 t8 t9 t10 t11"


CONFIG = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=256)


@pytest.fixture
async def client(redis_url, redis_client, tmp_path):
    async with gateway_with_engine(redis_url, write_random_model_dir("tiny", tmp_path / "tiny"), CONFIG) as c:
        yield c


BODY = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}


async def test_echo_carries_prompt_logprobs_and_offsets_after_the_prompt(client):
    r = await client.post("/v1/completions", json=BODY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_ids = client.engine.tokenizer.encode(PROMPT).ids
    n = len(prompt_ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    # The two most likely tokens, and the token itself when it is not one of them (OpenAI's logprobs + 1).
    pairs = zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True)
    assert all(2 <= len(top) <= 3 and tok in top for tok, top in pairs)
    # Offsets: the prompt's tokens from 0, the generated token right after the echoed prompt.
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][n] == len(PROMPT)
    assert choice["text"].startswith(PROMPT)
    # The prompt's logprobs are the engine's: the same request to an engine of the same weights agrees
    # (another one: the worker's engine is driven by its own thread).
    [ref] = LLMEngine(client.model_dir, CONFIG).generate([prompt_ids], SamplingParams(max_tokens=1, temperature=0.0, logprobs=2,
                                                                prompt_logprobs=2))
    assert lp["token_logprobs"][1:n] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]], abs=1e-5)
    perplexity = math.exp(-sum(lp["token_logprobs"][1:n]) / (n - 1))
    assert perplexity > 1


async def test_stream_carries_the_same_logprobs(client):
    plain = (await client.post("/v1/completions", json={**BODY, "max_tokens": 5})).json()["choices"][0]
    entries: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    async with client.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"] is not None:
                for key in entries:
                    entries[key] += choice["logprobs"][key]
    assert text == plain["text"]
    assert entries == plain["logprobs"]



async def test_max_tokens_zero_scores_the_prompt(client):
    r = await client.post("/v1/completions", json={**BODY, "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice, n = body["choices"][0], len(client.engine.tokenizer.encode(PROMPT).ids)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == n
    assert len(choice["logprobs"]["token_logprobs"]) == n and choice["logprobs"]["token_logprobs"][0] is None
    with_one = (await client.post("/v1/completions", json=BODY)).json()["choices"][0]["logprobs"]
    assert choice["logprobs"]["token_logprobs"] == with_one["token_logprobs"][:n]
    r = await client.post("/v1/completions", json={**BODY, "max_tokens": 0, "echo": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
