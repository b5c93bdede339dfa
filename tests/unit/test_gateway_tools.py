"""Tool calling at the gateway, without services: request checks, the constraint's schema, rendering through
chat templates (native and the Hermes fallback), and the streamed chunks' shapes (the openai client's
own types and stream accumulator read them)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from gateway import responses
from gateway.errors import ApiError
from gateway.prompts import PromptBuilder
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.tool_stream import ToolStream, call_deltas
from gateway.tools import FunctionDef, calls_schema, plan_tools
from protocol.jobs import ChatMessage, JobResult, Usage
from protocol.tools import ToolParsing
from protocol.workers import ModelCard

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def _plan(**fields):
    req = _chat(**fields)
    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, chat=True)


# --- request checks -----------------------------------------------------------------------------------

def test_auto_is_the_default_with_tools():
    plan = _plan(tools=[WEATHER, TIME])
    assert plan.parsing == ToolParsing(names=["get_weather", "get_time"], form="tagged", parallel=True)
    assert plan.guided is None
    assert plan.tools[0] == WEATHER


def test_none_offers_nothing_and_no_tools_is_no_plan():
    assert _plan(tools=[WEATHER], tool_choice="none") is None
    assert _plan() is None and _plan(tool_choice="auto") is None and _plan(tool_choice="none") is None


def test_required_and_named_constrain_the_output():
    plan = _plan(tools=[WEATHER, TIME], tool_choice="required")
    assert plan.parsing.form == "json" and plan.guided is not None and plan.guided.json_schema["type"] == "array"
    plan = _plan(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert "anyOf" in plan.guided.json_schema and plan.parsing.parallel is False
    plan = _plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert plan.parsing.names == ["get_time"] and plan.parsing.form == "json"
    assert plan.guided.json_schema["properties"]["name"] == {"enum": ["get_time"]}
    assert len(plan.tools) == 2  # the model still sees every tool, as OpenAI shows them


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope' is not among"),
    ({"tool_choice": "required"}, "tool_choice", "requires `tools`"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools", "JSON Schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"description": "y" * 49_000}}}}}]}, "tools", "at most 48000"),
])
def test_bad_tool_requests_are_400_naming_the_field(fields, param, words):
    with pytest.raises(ApiError) as e:
        _plan(**fields)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.mark.parametrize("tools", [
    [{"type": "function", "function": {"name": "has space"}}],
    [{"type": "function", "function": {"name": "x" * 65}}],
    [{"type": "function", "function": {"name": ""}}],
    [{"type": "retrieval", "function": {"name": "f"}}],
    [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)],
])
def test_tool_shapes_are_checked_by_the_request_model(tools):
    with pytest.raises(ValidationError):
        _chat(tools=tools)


def test_tools_are_for_chat_only():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "tools": [WEATHER]})
    with pytest.raises(ApiError) as e:
        plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, chat=False)
    assert e.value.param == "tools"


def test_tool_messages_need_their_call_id_and_calls_are_assistant_only():
    ChatMessage(role="assistant", content=None, tool_calls=[
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    with pytest.raises(ValidationError, match="tool_call_id"):
        ChatMessage(role="tool", content="42")
    with pytest.raises(ValidationError, match="only assistant"):
        ChatMessage(role="user", content="x", tool_calls=[{"id": "c", "function": {"name": "f"}}])


# --- the constraint's schema --------------------------------------------------------------------------

def _fn(tool: dict) -> FunctionDef:
    return FunctionDef.model_validate(tool["function"])


def test_calls_schema_accepts_exactly_valid_calls():
    schema = calls_schema([_fn(WEATHER), _fn(TIME)], many=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
          {"name": "get_time", "arguments": {"tz": "UTC"}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "get_weather", "arguments": {"unit": "c"}}],  # city missing
                [{"name": "get_weather", "arguments": {"city": "P", "unit": "k"}}],  # not in the enum
                [{"name": "get_time", "arguments": {"tz": "UTC"}, "extra": 1}],
                [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = calls_schema([_fn(WEATHER)], many=False)
    jsonschema.validate(ok[0], single)
    no_params = calls_schema([FunctionDef(name="ping")], many=False)
    jsonschema.validate({"name": "ping", "arguments": {}}, no_params)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "ping", "arguments": {"x": 1}}, no_params)


def test_calls_schema_keeps_refs_resolving():
    """A pydantic-made schema ($defs, $ref) and a recursive one ("#") still resolve once nested."""
    person = {"type": "object", "$defs": {"Address": {"type": "object", "properties": {"zip": {"type": "string"}},
                                                      "required": ["zip"]}},
              "properties": {"home": {"$ref": "#/$defs/Address"}}, "required": ["home"]}
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    schema = calls_schema([FunctionDef(name="person", parameters=person), FunctionDef(name="tree", parameters=tree)],
                          many=False)
    assert '"$defs":' not in json.dumps(schema["anyOf"]) and "person__Address" in schema["$defs"]  # at the root
    jsonschema.validate({"name": "person", "arguments": {"home": {"zip": "75001"}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "person", "arguments": {"home": {"zip": 75001}}}, schema)
    jsonschema.validate({"name": "tree", "arguments": {"children": [{"children": []}]}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "tree", "arguments": {"children": [{"children": 3}]}}, schema)


# --- rendering ------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
]


def _card(model_dir: Path, template: str | None = None) -> ModelCard:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return ModelCard(name="m", max_model_len=2048, tokenizer_json=(model_dir / "tokenizer.json").read_text(),
                     chat_template=template or (model_dir / "chat_template.jinja").read_text(),
                     bos_token=config.get("bos_token"), eos_token=config.get("eos_token"))


def test_fallback_renders_tools_calls_and_results_in_the_hermes_format(default_model_dir):
    builder = PromptBuilder(_card(Path(default_model_dir)))
    assert builder.native_tools is False  # smollm2's template knows no tools
    text = builder.render_chat([ChatMessage(**m) for m in HISTORY], tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "SmolLM" not in text  # the tools' system message replaces the template's default one
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>') in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # A system message keeps its text, the tools follow it; no tools: plain messages as before.
    sys = builder.render_chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="x")],
                              tools=[WEATHER])
    assert sys.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    plain = [ChatMessage(role="user", content="x")]
    assert builder.render_chat(plain, tools=None) == builder.render_chat(plain)


def test_consecutive_tool_results_are_one_user_turn(default_model_dir):
    builder = PromptBuilder(_card(Path(default_model_dir)))
    two = [*HISTORY, {"role": "tool", "tool_call_id": "call_b", "content": "noon"}]
    text = builder.render_chat([ChatMessage(**m) for m in two])
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\nnoon\n"
            "</tool_response><|im_end|>") in text


# A Qwen 2.5-style template (shortened): it reads `tools`, `tool_calls` and the tool role itself.
NATIVE_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are helpful.{% endif %}
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif not (tools and message.role == 'system') %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_native_template_gets_what_transformers_passes(default_model_dir):
    transformers = pytest.importorskip("transformers")
    builder = PromptBuilder(_card(Path(default_model_dir), NATIVE_TEMPLATE))
    assert builder.native_tools is True
    ours = builder.render_chat([ChatMessage(**m) for m in HISTORY], tools=[WEATHER, TIME])
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_dir))
    # transformers' convention: a call's arguments as an object (OpenAI sends a JSON string).
    theirs_history = json.loads(json.dumps(HISTORY))
    theirs_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    theirs = hf.apply_chat_template(theirs_history, tools=[WEATHER, TIME], chat_template=NATIVE_TEMPLATE,
                                    add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert '"arguments": {"city": "Paris"}' in ours and json.dumps(TIME) in ours


# --- streaming -------------------------------------------------------------------------------------------

def _stream(spec: ToolParsing, pieces: list[str]) -> tuple[str, ToolStream]:
    s = ToolStream(spec)
    return "".join(s.feed(p) for p in pieces), s


def test_stream_sends_content_until_a_call_and_holds_a_possible_tag():
    spec = ToolParsing(names=["get_time"], form="tagged")
    pieces = ["Sure", ", one ", "moment.", " \n<tool", "_call>", '{"name": "get_time", ', '"arguments": {}}', "</tool_call>"]
    s = ToolStream(spec)
    sent = [s.feed(p) for p in pieces]
    assert sent[:4] == ["Sure", ", one", " moment.", ""]  # " \n<tool" held: it may begin a call
    assert "".join(sent) == "Sure, one moment."
    text = "".join(pieces)
    result = JobResult(text=text, finish_reason="stop",
                       usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)).with_tool_calls(spec)
    assert result.content == "Sure, one moment." and s.rest(result) == ""


def test_stream_releases_held_text_that_was_not_a_call():
    spec = ToolParsing(names=["get_time"], form="tagged")
    pieces = ["a <to", "ol> b  ", "<tool_call>oops"]
    sent, s = _stream(spec, pieces)
    text = "".join(pieces)
    result = JobResult(text=text, finish_reason="stop",
                       usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)).with_tool_calls(spec)
    assert result.tool_calls is None
    assert sent + s.rest(result) == text == result.text  # every character once, in order


def test_json_form_holds_everything():
    sent, s = _stream(ToolParsing(names=["f"], form="json"), ['{"name": ', '"f", "arguments": {}}'])
    assert sent == "" and s.held == '{"name": "f", "arguments": {}}'


def test_streamed_tool_call_chunks_accumulate_with_the_openai_client():
    openai_streaming = pytest.importorskip("openai.lib.streaming.chat")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    spec = ToolParsing(names=["get_weather", "get_time"], form="tagged")
    text = ('Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
    result = JobResult(text=text, finish_reason="stop",
                       usage=Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14)).with_tool_calls(spec)
    stream = ToolStream(spec)
    chunks = [responses.chunk("chat", "job_1", "m", 0, text="", role=True)]
    for piece in [text[i:i + 7] for i in range(0, len(text), 7)]:
        sent = stream.feed(piece)
        if sent:
            chunks.append(responses.chunk("chat", "job_1", "m", 0, text=sent))
    chunks += [responses.chunk("chat", "job_1", "m", 0, tool_calls=d) for d in call_deltas(result.tool_calls)]
    chunks.append(responses.chunk("chat", "job_1", "m", 0, finish_reason=result.finish_reason))
    first_call = chunks[-5]["choices"][0]["delta"]["tool_calls"][0]
    assert set(first_call) == {"index", "id", "type", "function"} and first_call["function"]["arguments"] == ""

    state = openai_streaming.ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content == "Checking."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        (result.tool_calls[0].id, "get_weather", {"city": "Paris"}), (result.tool_calls[1].id, "get_time", {"tz": "CET"})]
    # The non-streamed answer has the same message, and the client's type reads it.
    body = responses.result_object("chat", "job_1", "m", 0, result, want_logprobs=False)
    parsed = ChatCompletion.model_validate(body).choices[0]
    assert parsed.finish_reason == "tool_calls" and parsed.message.content == "Checking."
    assert [c.model_dump() for c in parsed.message.tool_calls] == [c.model_dump() for c in result.tool_calls]


def test_lone_surrogates_in_parameters_are_refused():
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"description": "\ud800"}}}}}
    with pytest.raises(ValidationError, match="lone surrogate"):
        _chat(tools=[bad])


def test_cache_keys_hold_what_the_output_is_parsed_for():
    from protocol.jobs import JobPayload
    from protocol.sampling import SamplingParams
    from respcache.scope import exact_id, semantic_key

    plain = JobPayload(id="j", model="m", kind="chat", prompt_token_ids=[1, 2], sampling=SamplingParams())
    tools = plain.model_copy(update={"tools": ToolParsing(names=["f"])})
    one = plain.model_copy(update={"tools": ToolParsing(names=["f"], parallel=False)})
    assert len({exact_id(plain, "d"), exact_id(tools, "d"), exact_id(one, "d")}) == 3
    question = [ChatMessage(role="user", content="weather?")]
    assert semantic_key(plain, "d", question, None, None) is not None
    assert semantic_key(tools, "d", question, None, None) is None
    answered = [*question, ChatMessage(role="assistant", tool_calls=[{"id": "c", "function": {"name": "f"}}]),
                ChatMessage(role="tool", tool_call_id="c", content="21"), ChatMessage(role="user", content="so?")]
    assert semantic_key(plain, "d", answered, None, None) is None
