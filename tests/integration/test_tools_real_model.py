"""The tool-calling target on the CPU with the real smollm2-135m-instruct: `tool_choice: "required"` always
yields a call whose arguments validate against the function's parameters.

The gateway constrains such a request with a JSON schema (`sampling.guided`, gateway/tools.py); the engine
holds the output to it only with guided decoding in the engine (the `guided` branch). Without that this
135M model rarely writes a parseable call, and the test fails with the count it got."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

from gateway.app import create_app
from tests.integration.fake_worker import MODEL

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city's name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
            "to_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]}},
            "required": ["amount", "from_currency", "to_currency"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What's the weather like in Paris?", "Is it raining in London right now?", "How hot is it in Cairo, in fahrenheit?",
    "Tell me the temperature in Tokyo.", "Do I need a coat in Oslo today?", "Weather report for New York please.",
    "Is it sunny in Madrid?", "How cold is Moscow in celsius?", "What's the forecast for Sydney?",
    "Check the weather in Berlin for me.", "Convert 100 USD to EUR.", "How many yen is 50 dollars?",
    "Change 20 pounds into euros.", "What is 1000 JPY in USD?", "I have 75 euros, how much in pounds?",
    "Convert 3.5 GBP to JPY.", "How much is 12 dollars in pounds?", "Exchange 500 EUR for yen.",
    "What's the weather in Rome and should I bring an umbrella?", "Turn 42 USD into GBP.",
]


def _valid_calls(message: dict) -> list[str]:
    """Problems with the message's calls ([] when every call names a tool and its arguments validate)."""
    calls = message.get("tool_calls") or []
    if not calls:
        return [f"no call: {str(message.get('content'))[:120]!r}"]
    problems = []
    for call in calls:
        schema = PARAMETERS.get(call["function"]["name"])
        if schema is None:
            problems.append(f"unknown function {call['function']['name']!r}")
            continue
        try:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            problems.append(f"{call['function']['name']}: {str(e)[:120]}")
    return problems


@pytest.mark.parametrize("parallel", [False, True])
async def test_required_always_yields_valid_calls(redis_url, redis_client, default_model_dir, parallel):
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.service import WorkerService

    engine = LLMEngine(default_model_dir, EngineConfig(num_kv_blocks=512, max_model_len=2048))
    service = WorkerService(redis_url, MODEL, engine, engine.model_card(MODEL), worker_id="real:tools",
                            block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    app = create_app(redis_url)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=600) as client:

            async def ask(prompt: str) -> dict:
                r = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
                    "tool_choice": "required", "parallel_tool_calls": parallel, "temperature": 0,
                    "max_tokens": 160})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]

            choices = await asyncio.gather(*(ask(p) for p in PROMPTS))
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    failures = {p: _valid_calls(c["message"]) for p, c in zip(PROMPTS, choices, strict=True)}
    failures = {p: f for p, f in failures.items() if f}
    good = len(PROMPTS) - len(failures)
    print(f"\ntool_choice=required parallel_tool_calls={parallel}: {good}/{len(PROMPTS)} valid calls")
    assert not failures, f"{good}/{len(PROMPTS)} gave valid calls; failures: {json.dumps(failures, indent=1)[:3000]}"
    assert all(c["finish_reason"] == "tool_calls" for c in choices)
    if not parallel:
        assert all(len(c["message"]["tool_calls"]) == 1 for c in choices)
