"""n choices, best_of, logit_bias and stop_reason through the gateway, the worker and the real engine on a
tiny random model: every route (completions, chat, their streams, jobs and their events) answers n choices
with index 0..n-1, usage sums them, a seed reproduces them, and each choice says what stopped it."""

from __future__ import annotations

import asyncio
import json
import zlib

import pytest

from tests.integration.engine_stack import gateway_with_engine
from worker.engine.config import EngineConfig
from worker.models.random_weights import write_random_model_dir

MODEL = "tiny"
PROMPT = "t5 t6 t7 t8 t9 t10 t11"
CONFIG = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=256)
COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "ignore_eos": True}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 1.0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_random_model_dir("tiny", tmp_path_factory.mktemp("m") / "tiny")
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return path


@pytest.fixture
async def client(redis_url, redis_client, model_dir):
    async with gateway_with_engine(redis_url, model_dir, CONFIG) as c:
        yield c


async def sse_chunks(client, path: str, body: dict) -> list[dict]:
    chunks = []
    async with client.stream("POST", path, json={**body, "stream": True,
                                                 "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


async def test_completion_n_choices_seeded_and_usage_summed(client):
    body = {**COMPLETION, "n": 4, "seed": 7}
    first = (await client.post("/v1/completions", json=body)).json()
    again = (await client.post("/v1/completions", json=body)).json()
    choices = first["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in choices}) > 1
    assert all(c["finish_reason"] == "length" and c["stop_reason"] is None for c in choices)
    assert first["usage"]["completion_tokens"] == 4 * 6


async def test_chat_stream_carries_each_choice_by_index(client):
    body = {**CHAT, "n": 2, "seed": 3}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    chunks = await sse_chunks(client, "/v1/chat/completions", body)
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = (choice["finish_reason"], choice["stop_reason"])
    assert [chunks[i]["choices"][0]["delta"] for i in (0, 1)] == [{"role": "assistant", "content": ""}] * 2
    assert texts == {c["index"]: c["message"]["content"] for c in plain["choices"]}
    assert finishes == {0: ("length", None), 1: ("length", None)}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_choice_that_ends_first_ends_its_stream_at_once(client, path):
    """As OpenAI's streams do: its finish chunk does not wait for the job's other choices."""
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), "n": 4, "seed": 11, "max_tokens": 16}
    answer = (await client.post(path, json=body)).json()["choices"]
    free = [c.get("text", (c.get("message") or {}).get("content")) for c in answer]
    # A stop string early in choice 0's text and in no other's: choice 0 ends long before the rest.
    stop = next(free[0][i:i + 3] for i in range(1, len(free[0]) - 3)
                if free[0][i:i + 3].strip() and all(free[0][i:i + 3] not in t for t in free[1:]))
    chunks = await sse_chunks(client, path, {**body, "stop": [stop]})
    ends = [(k, c["choices"][0]) for k, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(choice["index"] for _, choice in ends) == [0, 1, 2, 3]  # each choice ends once
    [(first_end, choice0)] = [(k, choice) for k, choice in ends if choice["index"] == 0]
    assert (choice0["finish_reason"], choice0["stop_reason"]) == ("stop", stop)
    others_text = [k for k, c in enumerate(chunks) if c["choices"] and c["choices"][0]["index"] != 0
                   and (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))]
    assert first_end < max(others_text)  # the others still streamed after it
    assert chunks[-1]["usage"]["completion_tokens"] > 3 * 15  # and the usage chunk is still the last


async def test_best_of_returns_n_and_cannot_stream(client):
    r = await client.post("/v1/completions", json={**COMPLETION, "n": 2, "best_of": 4, "seed": 1, "logprobs": 0})
    assert r.status_code == 200, r.text
    best = r.json()["choices"]
    every = (await client.post("/v1/completions", json={**COMPLETION, "n": 4, "seed": 1, "logprobs": 0})).json()
    ranked = sorted(every["choices"], key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert [c["text"] for c in best] == [c["text"] for c in ranked[:2]]
    r = await client.post("/v1/completions", json={**COMPLETION, "n": 2, "best_of": 4, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


async def test_stop_reason_and_include_stop_str_on_every_route(client):
    greedy = {**COMPLETION, "temperature": 0.0}
    free = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    cut = free.index(stop)
    choice = (await client.post("/v1/completions", json={**greedy, "stop": [stop]})).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (free[:cut], "stop", stop)
    kept = (await client.post("/v1/completions", json={**greedy, "stop": [stop],
                                                       "include_stop_str_in_output": True})).json()
    assert kept["choices"][0]["text"] == free[: cut + len(stop)]
    chunks = await sse_chunks(client, "/v1/completions", {**greedy, "stop": [stop]})
    [last] = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert last["stop_reason"] == stop
    job = (await client.post("/v1/jobs", json={**greedy, "stop": [stop]})).json()
    for _ in range(600):
        got = (await client.get(f"/v1/jobs/{job['id']}")).json()
        if got["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert got["result"]["choices"][0]["stop_reason"] == stop


async def test_logit_bias_through_the_gateway(client):
    token = 42
    r = await client.post("/v1/completions", json={**COMPLETION, "temperature": 0.0, "max_tokens": 3,
                                                   "logit_bias": {str(token): 100}, "logprobs": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [client.engine.tokenizer.decode([token])] * 3


async def test_job_events_carry_choice_indexes_and_resume_per_choice(client):
    job = (await client.post("/v1/jobs", json={**COMPLETION, "n": 2, "seed": 5, "stream": True})).json()
    texts = {0: "", 1: ""}
    ids = []
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        event = None
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "delta":
                    assert data["offset"] == len(texts[data["index"]])
                    texts[data["index"]] += data["text"]
                else:
                    done = data
    assert event == "done"
    assert texts == {c["index"]: c["text"] for c in done["result"]["choices"]}
    assert ids[-1] == ",".join(f"{len(t)}.{zlib.crc32(t.encode()):08x}" for t in (texts[0], texts[1]))
    # Resuming from choice 0's end and choice 1's start gives choice 1 only.
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events",
                             headers={"Last-Event-ID": f"{ids[-1].split(',')[0]},0"}) as r:
        body = (await r.aread()).decode()
    deltas = [json.loads(ln[6:]) for ln in body.split("\n") if ln.startswith("data: ") and '"offset"' in ln
              and '"object"' not in ln]
    assert [(d["index"], d["text"]) for d in deltas] == [(1, texts[1])]
