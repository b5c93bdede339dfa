"""/v1/completions with several prompts, as OpenAI and vLLM take it (lm-evaluation-harness sends its
requests so): one completion whose choices run prompt by prompt, each the same as that prompt sent alone,
streamed or not, with the usage summed. Gateway, worker and the real engine on a tiny random model."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.prompt_list import prompt_key
from protocol import keys
from respcache import keys as cache_keys
from tests.asserts import assert_error
from tests.integration.engine_stack import gateway_with_engine
from worker.engine.config import EngineConfig
from worker.models.random_weights import write_random_model_dir

MODEL = "tiny"
PROMPTS = ["t5 t6 t7", "t8 t9 t10 t11 t12", "t13"]
CONFIG = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=256)


@pytest.fixture
async def client(redis_url, redis_client, tmp_path):
    async with gateway_with_engine(redis_url, write_random_model_dir("tiny", tmp_path / "tiny"), CONFIG) as c:
        yield c


async def alone(client, prompt, **fields) -> dict:
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def sse_chunks(text: str) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


async def test_choices_run_prompt_by_prompt_as_each_prompt_alone(client):
    fields = {**GREEDY, "n": 2, "logprobs": 2}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    singles = [await alone(client, p, **fields) for p in PROMPTS]
    assert [c["index"] for c in body["choices"]] == list(range(2 * len(PROMPTS)))
    for i, single in enumerate(singles):
        for j in range(2):
            got, want = body["choices"][2 * i + j], single["choices"][j]
            assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
            assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-5)
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][field] == sum(s["usage"][field] for s in singles)
    assert body["usage"]["prompt_tokens"] == sum(len(client.engine.tokenizer.encode(p).ids) for p in PROMPTS)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


async def test_token_id_prompts_and_echo_scoring(client):
    """lm-evaluation-harness's loglikelihood requests: several token-id prompts, echo, logprobs, no new
    tokens. Each prompt's logprobs are the ones it gets alone."""
    ids = [client.engine.tokenizer.encode(p).ids for p in PROMPTS]
    fields = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, **fields})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(ids)
    for choice, prompt in zip(choices, ids, strict=True):
        single = (await alone(client, prompt, **fields))["choices"][0]
        assert choice["text"] == single["text"]
        assert len(choice["logprobs"]["tokens"]) == len(prompt)
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(single["logprobs"]["token_logprobs"][1:],
                                                                         abs=1e-5)


async def test_a_stream_of_several_prompts(client):
    fields = {**GREEDY, "n": 2}
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, "stream": True,
                                                   "stream_options": {"include_usage": True}, **fields})
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    whole = await alone(client, PROMPTS, **fields)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    texts: dict[int, str] = {}
    finished = {}
    for c in chunks[:-1]:
        assert c["usage"] is None  # OpenAI: every chunk but the last carries usage null
        [choice] = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finished == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6 * 2 * len(PROMPTS)
    assert chunks[-1]["usage"] == whole["usage"]


async def test_a_stream_without_usage_carries_none(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[:2], "stream": True,
                                                   **GREEDY})
    chunks = sse_chunks(r.text)
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


async def test_a_retried_key_gets_each_prompts_first_job(client, redis_client):
    body = {"model": MODEL, "prompt": PROMPTS, **GREEDY}
    first = await client.post("/v1/completions", json=body, headers={"Idempotency-Key": "several-1"})
    again = await client.post("/v1/completions", json=body, headers={"Idempotency-Key": "several-1"})
    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json()
    bound = {await redis_client.get(keys.idem_key("default", prompt_key("several-1", i), MODEL)) for i in range(3)}
    assert len(bound) == 3 and None not in bound


@pytest.mark.parametrize("prompts", [PROMPTS[:2], [*PROMPTS, "t40 t41"], [PROMPTS[0], "t40 t41", PROMPTS[2]],
                                     PROMPTS[0]])
async def test_a_key_retried_with_other_prompts_is_refused(client, redis_client, prompts):
    """Each prompt's key carries the digest of the whole list: a retry with fewer, more or other prompts gets a
    422 and queues nothing, rather than the first jobs of the prompts it shares."""
    headers = {"Idempotency-Key": "several-2"}
    first = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, **GREEDY}, headers=headers)
    assert first.status_code == 200, first.text
    jobs = await redis_client.keys(keys.job_key("*"))
    err = assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, **GREEDY},
                                         headers=headers), 422)
    assert err["code"] == "idempotency_key_reused"
    assert await redis_client.keys(keys.job_key("*")) == jobs
    assert await redis_client.get(keys.idem_key("default", prompt_key("several-2", 3), MODEL)) is None


async def test_a_key_first_used_for_one_prompt_is_refused_for_several(client, redis_client):
    headers = {"Idempotency-Key": "several-3"}
    first = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], **GREEDY},
                              headers=headers)
    assert first.status_code == 200, first.text
    err = assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, **GREEDY},
                                         headers=headers), 422)
    assert err["code"] == "idempotency_key_reused"
    assert await redis_client.get(keys.idem_key("default", prompt_key("several-3", 1), MODEL)) is None


async def test_a_clients_key_is_never_another_requests_prompts(client):
    """Each prompt's own key is joined by a character no header holds: a client's `K#1` is not prompt 1 of a
    later request keyed `K`."""
    r = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "t30 t31", **GREEDY},
                          headers={"Idempotency-Key": "K#1"})
    assert r.status_code == 202
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[:2], **GREEDY},
                          headers={"Idempotency-Key": "K"})
    assert r.status_code == 200, r.text
    expected = [(await alone(client, p, **GREEDY))["choices"][0]["text"] for p in PROMPTS[:2]]
    assert [c["text"] for c in r.json()["choices"]] == expected


async def test_each_prompt_is_answered_from_the_response_cache(client, redis_client):
    """A repeat of a cached request of several prompts is answered without a job reaching the worker."""
    body = {"model": MODEL, "prompt": PROMPTS[:2], **GREEDY, "cache": {"mode": "exact"}}
    first = await client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    for _ in range(200):  # each entry is written just after its job's result
        if await redis_client.zcard(cache_keys.index_key("default")) == 2:
            break
        await asyncio.sleep(0.01)
    again = await client.post("/v1/completions", json=body)
    assert again.status_code == 200, again.text
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in first.json()["choices"]]
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]  # every prompt a hit
    job_id = "job_" + again.json()["id"].removeprefix("cmpl-")
    assert await redis_client.hget(keys.job_key(job_id), "cache") == "exact"
