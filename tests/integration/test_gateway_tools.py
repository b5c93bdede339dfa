"""Tool calling end to end through the gateway and a fake worker whose output the test chooses: the prompt
the model sees, the parsed calls in chat answers (plain and streamed), jobs, webhooks' body, and the
official openai client's round trip (a call, then the tool's result sent back)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import redis

from gateway.app import create_app
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobPayload
from tests.asserts import assert_error
from tests.integration.fake_worker import MODEL, FakeWorker, ThreadedFakeWorker
from tests.processes import GatewayThread
from worker.webhooks.event import event_body

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
REPLIES: dict[str, str | list[str]] = {
    "REPLY_CALL": "Let me look that up.\n" + CALL,
    "REPLY_TWO": CALL + "\n" + CALL.replace("Paris", "Oslo"),
    "REPLY_JSON": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "REPLY_BAD": '<tool_call>\n{"name": "get_weather", "argu',
    # One reply a choice, in turn (asked with n=3): a call, plain text, another call.
    "REPLY_MIX": ["Checking.\n" + CALL, "No tool needed: it is sunny.", CALL.replace("Paris", "Oslo")],
}


class Replies:
    """The fake model: answers by the marker in the last user turn, and keeps every prompt it saw."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.turn = 0  # the next of a list of replies

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        last = prompt.rsplit("user\n", 1)[-1]
        out = next((out for marker, out in REPLIES.items() if marker in last), "It is 21 degrees in Paris.")
        if isinstance(out, list):
            out, self.turn = out[self.turn % len(out)], self.turn + 1
        return out


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def app(redis_url, redis_client):
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as c:
        yield c


@pytest.fixture
async def worker(redis_url, redis_client, default_model_dir):
    w = FakeWorker(redis_url, default_model_dir, step_s=0.002, reply=Replies())
    await w.start()
    yield w
    await w.stop()


async def _chat(client, **body) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body})


async def test_auto_call_is_parsed_and_the_model_saw_the_tools(client, worker):
    r = await _chat(client, messages=_user("REPLY_CALL weather in Paris?"), tools=[WEATHER])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me look that up."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt = worker.reply.prompts[-1]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and "<tool_call>" in prompt


async def test_malformed_call_is_plain_content(client, worker):
    r = await _chat(client, messages=_user("REPLY_BAD"), tools=[WEATHER])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == REPLIES["REPLY_BAD"]


async def test_tool_choice_none_offers_no_tools_and_parses_nothing(client, worker):
    r = await _chat(client, messages=_user("REPLY_CALL"), tools=[WEATHER], tool_choice="none")
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == REPLIES["REPLY_CALL"]
    assert "<tools>" not in worker.reply.prompts[-1]


async def test_parallel_tool_calls_false_keeps_one(client, worker):
    r = await _chat(client, messages=_user("REPLY_TWO"), tools=[WEATHER])
    assert [json.loads(c["function"]["arguments"])["city"] for c in r.json()["choices"][0]["message"]["tool_calls"]] \
        == ["Paris", "Oslo"]
    r = await _chat(client, messages=_user("REPLY_TWO"), tools=[WEATHER], parallel_tool_calls=False)
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


async def test_required_constrains_and_parses_the_bare_json_call(client, worker, redis_client):
    r = await _chat(client, messages=_user("REPLY_JSON"), tools=[WEATHER],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    job_id = "job_" + body["id"].removeprefix("chatcmpl-")
    payload = JobPayload.model_validate_json(await redis_client.hget(keys.job_key(job_id), F.PAYLOAD))
    schema = payload.sampling.guided.json_schema  # what the engine is asked to hold the output to
    assert schema["properties"]["name"] == {"enum": ["get_weather"]}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert payload.tools.form == "json" and payload.tools.names == ["get_weather"]


async def test_streamed_calls_equal_the_plain_answer(client, worker):
    plain = (await _chat(client, messages=_user("REPLY_CALL"), tools=[WEATHER])).json()["choices"][0]
    r = await _chat(client, messages=_user("REPLY_CALL"), tools=[WEATHER], stream=True)
    chunks = [json.loads(part.removeprefix("data: ")) for part in r.text.split("\n\n")
              if part.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert content == plain["message"]["content"]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # Held back, not lost: a stream whose "call" did not parse sends all of its text as content.
    r = await _chat(client, messages=_user("REPLY_BAD"), tools=[WEATHER], stream=True)
    chunks = [json.loads(part.removeprefix("data: ")) for part in r.text.split("\n\n") if part.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == REPLIES["REPLY_BAD"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _cities(message: dict) -> list[str]:
    return [json.loads(c["function"]["arguments"])["city"] for c in message.get("tool_calls") or []]


async def test_each_of_n_choices_carries_its_own_calls(client, worker, redis_client):
    r = await _chat(client, messages=_user("REPLY_MIX"), tools=[WEATHER], n=3)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "stop", "tool_calls"]
    assert [_cities(c["message"]) for c in choices] == [["Paris"], [], ["Oslo"]]
    assert [c["message"]["content"] for c in choices] == ["Checking.", REPLIES["REPLY_MIX"][1], None]
    assert "tool_calls" not in choices[1]["message"]
    # The webhook body: each choice with its calls.
    job_id = "job_" + r.json()["id"].removeprefix("chatcmpl-")
    event = json.loads(event_body(job_id, await redis_client.hgetall(keys.job_key(job_id))))
    result = event["data"]["result"]
    assert [c["finish_reason"] for c in result["choices"]] == ["tool_calls", "stop", "tool_calls"]
    assert [_cities(c) for c in result["choices"]] == [["Paris"], [], ["Oslo"]]
    assert result["tool_calls"] == choices[0]["message"]["tool_calls"]  # the fields beside: choice 0's


async def test_streamed_n_choices_with_tools_equal_the_plain_answer(client, worker):
    plain = (await _chat(client, messages=_user("REPLY_MIX"), tools=[WEATHER], n=3)).json()["choices"]
    r = await _chat(client, messages=_user("REPLY_MIX"), tools=[WEATHER], n=3, stream=True)
    assert r.status_code == 200, r.text
    chunks = [json.loads(part.removeprefix("data: ")) for part in r.text.split("\n\n")
              if part.startswith("data: {")]
    for want in plain:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == want["index"]]
        content = "".join(c["delta"].get("content") or "" for c in mine)
        calls = [tc for c in mine for tc in c["delta"].get("tool_calls") or []]
        assert content == (want["message"]["content"] or "")
        named = [tc for tc in calls if tc.get("id")]
        assert [tc["function"]["name"] for tc in named] == [c["function"]["name"]
                                                            for c in want["message"].get("tool_calls") or []]
        assert "".join(tc["function"]["arguments"] for tc in calls) == "".join(
            c["function"]["arguments"] for c in want["message"].get("tool_calls") or [])
        assert mine[-1]["finish_reason"] == want["finish_reason"]


async def test_jobs_and_webhook_body_carry_the_calls(client, worker, redis_client):
    r = await client.post("/v1/jobs", json={"model": MODEL, "messages": _user("REPLY_CALL"), "tools": [WEATHER]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(300):
        got = (await client.get(f"/v1/jobs/{job_id}")).json()
        if got["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    message = got["result"]["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    event = json.loads(event_body(job_id, await redis_client.hgetall(keys.job_key(job_id))))
    assert event["data"]["result"]["finish_reason"] == "tool_calls"
    assert event["data"]["result"]["tool_calls"] == message["tool_calls"]


async def test_history_with_calls_and_results_renders(client, worker):
    messages = [*_user("REPLY_CALL weather?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    r = await _chat(client, messages=messages, tools=[WEATHER])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "It is 21 degrees in Paris."
    prompt = worker.reply.prompts[-1]
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0"),
])
async def test_bad_tool_requests_are_400(client, worker, body, param):
    r = await _chat(client, **{"messages": _user("x"), **body})
    err = assert_error(r, 400)
    assert (err["param"] or "").startswith(param), err


async def test_completions_refuse_tools(client, worker):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "tools": [WEATHER]})
    assert_error(r, 400, "tools")


@pytest.fixture
def base_url(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url:
        yield url


def test_openai_client_round_trip(base_url, redis_url, default_model_dir):
    """docs/tools.md's example, against the gateway."""
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.002, reply=Replies()):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        messages = _user("REPLY_CALL What is the weather in Paris?")
        first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto")
        assert first.choices[0].finish_reason == "tool_calls"
        call = first.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})}]
        second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
        assert second.choices[0].message.content == "It is 21 degrees in Paris."
        with client.chat.completions.stream(model=MODEL, messages=_user("REPLY_CALL"), tools=[WEATHER]) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
