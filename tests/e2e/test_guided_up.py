"""Structured outputs through `tokenq up` (real processes, the default model on the CPU), as clients send
them: the official openai client's `parse` with a pydantic model, vLLM's guided_* fields on completions,
SSE streaming, /v1/jobs with the engine's own spec, and a bad constraint refused by name."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_up import tokenq_up  # noqa: F401 - the fixture: a stack of this module's own

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)
    is_capital: bool


def test_openai_client_parse_with_a_pydantic_model(tokenq_up):  # noqa: F811
    from openai import OpenAI

    base, _, _ = tokenq_up
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") \
        else client.beta.chat.completions.parse
    reply = parse(model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                  response_format=City, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    city = choice.message.parsed
    assert isinstance(city, City) and city.name


def test_guided_choice_on_completions_and_regex_streamed_on_chat(tokenq_up):  # noqa: F811
    base, _, _ = tokenq_up
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "Is the sky blue? Answer:", "max_tokens": 8, "temperature": 0,
        "guided_choice": ["yes", "no", "maybe"]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no", "maybe")

    pattern = r"[0-9]{3}-[0-9]{4}"
    text, reasons = "", []
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Give me a phone number."}],
            "max_tokens": 16, "temperature": 0, "stream": True, "guided_regex": pattern}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                reasons.append(choice.get("finish_reason"))
    assert re.fullmatch(pattern, text), text
    assert reasons[-1] == "stop"


def test_jobs_take_the_spec_and_bad_constraints_are_400(tokenq_up):  # noqa: F811
    base, _, _ = tokenq_up
    schema = {"type": "object", "properties": {"answer": {"enum": ["red", "green", "blue"]}},
              "required": ["answer"], "additionalProperties": False}
    r = httpx.post(f"{base}/v1/jobs", json={"model": MODEL, "prompt": "My favourite colour is", "max_tokens": 32,
                                            "temperature": 0, "guided": {"json_schema": schema}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert json.loads(job["result"]["choices"][0]["text"])["answer"] in ("red", "green", "blue")

    bad = httpx.post(f"{base}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
    # A grammar only the engine can judge fails that job alone, with the reason.
    r = httpx.post(f"{base}/v1/jobs", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                            "guided_grammar": "root ::= missing"})
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert job["status"] == "failed" and "grammar" in json.dumps(job["error"]), job
