"""Bad input stays one client's problem: every field is bounded at the gateway, strings must be valid
Unicode, and OpenAI fields tokenq does not implement are refused by name rather than ignored."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.app import create_app
from protocol import keys
from tests.asserts import assert_error
from tests.integration.fake_worker import MODEL, FakeWorker

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
PROMPT = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
ROUTES = [("/v1/jobs", CHAT), ("/v1/chat/completions", CHAT), ("/v1/completions", PROMPT)]


@pytest.fixture
async def client(redis_url, redis_client, default_model_dir):
    app = create_app(redis_url)
    worker = FakeWorker(redis_url, default_model_dir)
    await worker.start()
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                         timeout=30) as c:
                yield c
    finally:
        await worker.stop()


async def post_raw(client: httpx.AsyncClient, path: str, text: str) -> httpx.Response:
    """A body written by hand: JSON that json.dumps would not write (NaN, lone surrogates)."""
    return await client.post(path, content=text.encode(), headers={"content-type": "application/json"})


async def assert_nothing_queued(redis_client) -> None:
    assert await redis_client.keys(keys.job_keys_pattern()) == []


@pytest.mark.parametrize("path, body", ROUTES)
@pytest.mark.parametrize("fields, param, needle", [
    ({"top_k": 1e20}, "top_k", "top_k"),
    ({"top_k": 49153}, "top_k", "vocabulary size 49152"),
    ({"stop_token_ids": [999999999], "min_tokens": 2}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": [49152]}, "stop_token_ids", "0 to 49151"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0", "greater than or equal to 0"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
    ({"stop": ["x" * 257]}, "stop", "at most 256 characters"),
    ({"seed": 2**64}, "seed", "less than or equal to"),
    ({"min_tokens": 10**12, "max_tokens": 4}, "min_tokens", "less than or equal to 1000000"),
    ({"user": "u" * 257}, "user", "String should have at most 256 characters"),  # not "256 items"
    ({"model": "m" * 257}, "model", "String should have at most 256 characters"),
])
async def test_poison_values_are_400_naming_the_field(client, redis_client, path, body, fields, param, needle):
    err = assert_error(await client.post(path, json={**body, **fields}), 400, param)
    assert needle in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path, body", ROUTES)
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty", "min_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_400(client, redis_client, path, body, field, value):
    text = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    err = assert_error(await post_raw(client, path, text), 400)
    assert field in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path, body, extra, param", [
    ("/v1/completions", PROMPT, '"prompt": "a\\ud800b"', "prompt"),
    ("/v1/completions", PROMPT, '"prompt": ["a\\udfffb"]', "prompt.0"),
    ("/v1/completions", PROMPT, '"stop": "\\ud800"', "stop"),
    ("/v1/chat/completions", CHAT, '"messages": [{"role": "user", "content": "\\ud83d"}]',
     "messages.0.content"),
    ("/v1/chat/completions", CHAT, '"messages": [{"role": "user", "content": [{"type": "text", '
                                   '"text": "\\ud800"}]}]', "messages.0.content.0.text"),
    ("/v1/chat/completions", CHAT, '"user": "\\ud800"', "user"),
    ("/v1/jobs", CHAT, '"metadata": {"k": "\\ud800"}', "metadata.k"),
    ("/v1/jobs", CHAT, '"webhook_url": "https://example.com/\\ud800"', "webhook_url"),
    ("/v1/jobs", CHAT, '"model": "\\ud800"', "model"),
    # JSON-valued fields: a surrogate anywhere inside, keys included (pydantic could not store the request)
    ("/v1/completions", PROMPT, '"guided_choice": ["a", "\\ud800"]', "guided_choice.1"),
    ("/v1/completions", PROMPT, '"guided_json": "{\\"enum\\": [\\"\\\\ud800\\"]}"', "guided_json"),
    ("/v1/chat/completions", CHAT, '"chat_template_kwargs": {"k": {"\\ud800": 1}}', "chat_template_kwargs.k"),
    ("/v1/chat/completions", CHAT, '"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                                   '"schema": {"enum": ["\\ud800"]}}}', "response_format"),
    ("/v1/jobs", CHAT, '"guided": {"choice": ["\\udc00"]}', "guided.choice.0"),
    ("/v1/chat/completions", CHAT, '"messages": [{"role": "user", "content": [{"type": "text", "text": "x", '
                                   '"k": "\\ud800"}]}]', "messages.0.content.0.k"),
])
async def test_lone_surrogates_are_400_naming_the_field(client, redis_client, path, body, extra, param):
    text = json.dumps(body)[:-1] + ", " + extra + "}"
    err = assert_error(await post_raw(client, path, text), 400, param)
    assert "surrogate" in err["message"] or "unicode" in err["message"], err["message"]
    await assert_nothing_queued(redis_client)
    metrics = (await client.get("/metrics")).text
    assert 'status="500"' not in metrics


@pytest.mark.parametrize("path, body", ROUTES)
@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}),
    ("suffix", "the end"),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("use_beam_search", True),
    ("chat_template", "{{ messages }}"),
    ("truncate_prompt_tokens", 2),
    ("allowed_token_ids", [1, 2]),
    ("bad_words", ["no"]),
    ("documents", [{"text": "a"}]),
    ("prompt_logprobs", 1),
    ("return_tokens_as_token_ids", True),
    ("skip_special_tokens", False),
    ("spaces_between_special_tokens", False),
])
async def test_unsupported_fields_are_refused_by_name(client, redis_client, path, body, field, value):
    err = assert_error(await client.post(path, json={**body, field: value}), 400, field)
    assert err["code"] == "unsupported_field" and field in err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
async def test_a_chats_echo_is_refused(client, redis_client, path):
    """vLLM's chat echo (the final message repeated before the answer) is not served: without it the answer
    would lack what the client asked to see."""
    err = assert_error(await client.post(path, json={**CHAT, "echo": True}), 400, "echo")
    assert err["code"] == "unsupported_field"
    r = await client.post(path, json={**CHAT, "echo": False})
    assert r.status_code in (200, 202), r.text
    jobs = len(await redis_client.keys(keys.job_keys_pattern()))
    assert_error(await client.post(path, json={**CHAT, "echo": True}), 400, "echo")
    assert len(await redis_client.keys(keys.job_keys_pattern())) == jobs


@pytest.mark.parametrize("field, value", [("chat_template_kwargs", {"enable_thinking": False}),
                                          ("add_generation_prompt", False)])
async def test_a_prompt_refuses_chat_template_options_on_completions_too(client, redis_client, field, value):
    err = assert_error(await client.post("/v1/completions", json={**PROMPT, field: value}), 400, field)
    assert "a prompt is not rendered by a template" in err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path, body", ROUTES[1:])
@pytest.mark.parametrize("field, value", [("suffix", '"\\ud800"'), ("function_call", '{"name": "\\ud800"}'),
                                          ("audio", '"\\ud800"'), ("prediction", '["\\ud800"]'),
                                          ("use_beam_search", '"\\ud800"')])
async def test_an_error_that_quotes_a_lone_surrogate_still_encodes(client, redis_client, path, body, field, value):
    """The message quotes the client's value; UTF-8 cannot hold the surrogate, so it is written escaped."""
    text = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    err = assert_error(await post_raw(client, path, text), 400, field)
    assert err["code"] == "unsupported_field" and "\\ud800" in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path, body, fields, param", [
    ("/v1/completions", PROMPT, {"guided_json": "[" * 100_000 + "]" * 100_000}, "guided_json"),
    ("/v1/chat/completions", CHAT, {"chat_template_kwargs": {"k": json.loads("[" * 300 + "]" * 300)}},
     "chat_template_kwargs.k"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "extra": json.loads("[" * 300 + "]" * 300)}]}]}, {}, "messages.0.content.0.extra"),
])
async def test_json_nested_too_deep_is_400_naming_the_field(client, redis_client, path, body, fields, param):
    """JSON text past the parser's depth (a RecursionError), or a value past what pydantic writes when the
    request is stored: both were 500s."""
    err = assert_error(await client.post(path, json={**body, **fields}), 400, param)
    assert "nest" in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


async def test_tool_call_arguments_nested_past_the_parser_are_taken_as_text(client):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c", "content": "x"}, {"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
async def test_image_and_audio_parts_are_refused(client, redis_client, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]
    for path in ("/v1/chat/completions", "/v1/jobs"):
        err = assert_error(await client.post(path, json={**CHAT, "messages": messages}), 400,
                           "messages.0.content.1.type")
        assert part["type"] in err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("role", ["user", "system", "developer"])
async def test_a_message_without_content_is_refused_unless_an_assistant_sends_it(client, redis_client, role):
    messages = [{"role": role, "content": None}, {"role": "user", "content": "hi"}]
    for path in ("/v1/chat/completions", "/v1/jobs"):
        err = assert_error(await client.post(path, json={**CHAT, "messages": messages}), 400, "messages.0.content")
        assert f"a {role} message needs content" in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


async def test_a_refused_field_is_shown_as_the_client_wrote_it(client, redis_client):
    body = {**CHAT, "stream": False, "stream_options": {"include_usage": True}}
    err = assert_error(await client.post("/v1/chat/completions", json=body), 400, "stream_options")
    assert err["message"].endswith('(got {"include_usage":true})'), err["message"]
    err = assert_error(await client.post("/v1/chat/completions", json={**CHAT, "suffix": "the end"}), 400, "suffix")
    assert err["message"].endswith('(got "the end")'), err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("path, body", ROUTES[:2])
async def test_best_of_is_refused_for_a_chat(client, redis_client, path, body):
    err = assert_error(await client.post(path, json={**body, "n": 2, "best_of": 3}), 400, "best_of")
    assert err["code"] == "unsupported_field" and "completions" in err["message"]
    await assert_nothing_queued(redis_client)


@pytest.mark.parametrize("body, param, needle", [
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"best_of": 17}, "best_of", "less than or equal to 16"),
    ({"n": 3, "best_of": 2}, "best_of", "best_of: 2 must be at least n (3)"),
    ({"best_of": 3, "stream": True}, "best_of", "streaming is not supported"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias.5", "greater than or equal to -100"),
    ({"logit_bias": {"five": 1}}, "logit_bias.five", "valid integer"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "300"),
    ({"logit_bias": {"49152": 1}}, "logit_bias.49152", "outside the vocabulary"),
])
async def test_choice_and_bias_bounds_name_the_field(client, redis_client, body, param, needle):
    r = await client.post("/v1/completions", json={**PROMPT, **body})
    err = assert_error(r, 400, param)
    assert needle in err["message"], err["message"]
    await assert_nothing_queued(redis_client)


async def test_defaults_of_unsupported_fields_are_accepted(client):
    defaults = {"n": 1, "tool_choice": "none", "tools": [], "response_format": {"type": "text"},
                "logit_bias": {}, "functions": None, "parallel_tool_calls": False, "modalities": ["text"]}
    r = await client.post("/v1/chat/completions", json={**CHAT, **defaults})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json={**PROMPT, "best_of": 1, "suffix": None, "n": None})
    assert r.status_code == 200, r.text
    parts = [{"type": "text", "text": "red "}, {"type": "text", "text": "green"}]
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": parts}],
                                                        "max_tokens": 64, "temperature": 0})
    assert r.status_code == 200 and "red green" in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("url", ["https://example.com/a\r\nX-Injected: 1", "https://exa\tmple.com/",
                                 "https://example.com/\n", "https://example.com/a b", "https://example.com/\x00"])
async def test_webhook_urls_with_control_characters_are_refused(client, redis_client, url):
    err = assert_error(await client.post("/v1/jobs", json={**CHAT, "webhook_url": url}), 400, "webhook_url")
    assert "control character or space" in err["message"]
    await assert_nothing_queued(redis_client)


async def test_readiness_tells_no_address_or_error_text(redis_url):
    app = create_app("redis://127.0.0.1:1/0")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not ready", "reason": "redis_unavailable"}


async def test_openapi_documents_400_errors_and_the_bearer_scheme(client):
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "an API key made with `tokenq keys create`"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    for path in ("/v1/jobs", "/v1/completions", "/v1/chat/completions"):
        post = spec["paths"][path]["post"]
        assert "422" not in post["responses"]
        assert post["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
        assert post["security"] == [{"bearerAuth": []}]
        assert {"404", "409", "429"} <= set(post["responses"])  # no model, a key in use, a tenant limit
    assert "404" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert "422" not in json.dumps(spec["paths"])


async def test_an_unhandled_error_is_one_500_counted_once_and_not_raised_to_the_server(client, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.routes_jobs.read_job", broken)
    # ASGITransport raises what escapes the app, as a server would log it a second time: nothing does.
    r = await client.get("/v1/jobs/job_x")
    err = assert_error(r, 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    metrics = (await client.get("/metrics")).text
    assert 'tokenq_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="500"} 1.0' in metrics


async def test_a_client_that_leaves_mid_upload_is_no_unhandled_error(client, monkeypatch):
    """An upload whose client left (or whose connection the read limit closed) was logged as an unhandled
    error with its traceback, and counted a 500."""
    from starlette.requests import ClientDisconnect
    from structlog.testing import capture_logs

    async def left(*args, **kwargs):
        raise ClientDisconnect()

    monkeypatch.setattr("gateway.routes_jobs.read_job", left)
    with capture_logs() as logs:
        with pytest.raises(AssertionError):  # httpx's ASGITransport: the app returned without an answer
            await client.get("/v1/jobs/job_x")
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert "client left before its request arrived whole" in [e["event"] for e in logs]
    metrics = (await client.get("/metrics")).text
    assert 'tokenq_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="499"} 1.0' in metrics


@pytest.mark.parametrize("path, body, nulls", [
    ("/v1/chat/completions", CHAT, {"stream": None, "logprobs": None, "add_generation_prompt": None,
                                    "run_to_completion": None, "priority": None}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
     {"stream": None, "echo": None, "logprobs": None, "stream_options": None}),
    ("/v1/jobs", {"model": MODEL, "prompt": "hi", "max_tokens": 1}, {"stream": None, "echo": None, "metadata": None}),
])
async def test_an_explicit_null_is_the_fields_default(client, redis_client, path, body, nulls):
    """OpenAI types these "boolean or null": clients that write every field out send nulls."""
    r = await client.post(path, json={**body, **nulls})
    assert r.status_code == (202 if path == "/v1/jobs" else 200), r.text
    if path != "/v1/jobs":  # answered as without the nulls: not streamed
        assert r.headers["content-type"].startswith("application/json") and r.json()["choices"]


@pytest.mark.parametrize("content, param, words", [
    ([{"type": "text"}], "messages.0.content.0.text", "messages.0.content.0.text: a text part needs its text"),
    ([], "messages.0.content", "messages.0.content: an empty list of parts"),
])
async def test_an_empty_text_part_or_list_is_refused_naming_it(client, redis_client, content, param, words):
    for path in ("/v1/chat/completions", "/v1/jobs"):
        err = assert_error(await client.post(path, json={**CHAT, "messages": [{"role": "user", "content": content}]}),
                           400, param)
        assert words in err["message"], err["message"]
    await assert_nothing_queued(redis_client)
