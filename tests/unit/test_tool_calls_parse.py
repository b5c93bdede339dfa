"""Tool calls parsed from generated text (protocol/tools.py) and their place in a job's result."""

from __future__ import annotations

import json

import pytest

from protocol.jobs import JobResult, Usage
from protocol.tools import ToolParsing, content_before, parse_tool_calls

TAGGED = ToolParsing(names=["get_weather", "get_time"], form="tagged")
JSON = ToolParsing(names=["get_weather", "get_time"], form="json")


def _args(call) -> dict:
    return json.loads(call.function.arguments)


def test_one_tagged_call_with_text_before():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = parse_tool_calls(text, TAGGED)
    assert parsed is not None and parsed.content == "Let me check."
    [call] = parsed.calls
    assert call.type == "function" and call.function.name == "get_weather" and _args(call) == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) > 10


def test_several_tagged_calls_no_content_and_unclosed_last_block():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "parameters": {"tz": "CET"}}\n')  # stopped before the close tag
    parsed = parse_tool_calls(text, TAGGED)
    assert parsed is not None and parsed.content is None
    assert [c.function.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert _args(parsed.calls[1]) == {"tz": "CET"}
    assert len({c.id for c in parsed.calls}) == 2


def test_parallel_false_keeps_the_first_call():
    text = ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parsed = parse_tool_calls(text, TAGGED.model_copy(update={"parallel": False}))
    assert [c.function.name for c in parsed.calls] == ["get_weather"]


def test_arguments_given_as_a_json_string_are_normalized():
    text = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>'
    [call] = parse_tool_calls(text, TAGGED).calls
    assert _args(call) == {"tz": "UTC"}


@pytest.mark.parametrize("text", [
    "Just an answer, no tools needed.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut off mid-JSON
    '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not an offered function
    '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>not json</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call><tool_call>oops</tool_call>',  # one bad block
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # bare JSON is not a call in the tagged form
])
def test_malformed_or_absent_calls_are_plain_content(text):
    assert parse_tool_calls(text, TAGGED) is None


def test_json_form_object_and_array():
    one = parse_tool_calls('  {"name": "get_weather", "arguments": {"city": "Rome"}} ', JSON)
    assert one.content is None and [c.function.name for c in one.calls] == ["get_weather"]
    many = parse_tool_calls('[{"name": "get_weather", "arguments": {"city": "Rome"}},'
                            ' {"name": "get_time", "arguments": {}}]', JSON)
    assert [c.function.name for c in many.calls] == ["get_weather", "get_time"]
    assert parse_tool_calls("[]", JSON) is None
    assert parse_tool_calls('{"name": "get_weather"', JSON) is None
    assert parse_tool_calls("Sure! Here is the weather.", JSON) is None


def test_content_before_is_right_trimmed_text_before_the_tag():
    assert content_before("Hi there \n\n<tool_call>{}") == "Hi there"
    assert content_before("no tag  ") == "no tag"


def _result(text: str, reason: str = "stop") -> JobResult:
    return JobResult(text=text, finish_reason=reason, usage=Usage(prompt_tokens=1, completion_tokens=1,
                                                                   total_tokens=2))


def test_job_result_with_tool_calls():
    text = 'ok <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    got = _result(text).with_tool_calls(TAGGED)
    assert got.finish_reason == "tool_calls" and got.content == "ok" and got.text == text
    assert got.tool_calls[0].function.arguments == "{}"
    # The stored result round-trips (webhooks and /v1/jobs read it back from the job hash).
    assert JobResult.model_validate_json(got.model_dump_json()) == got
    assert _result(text, "abort").with_tool_calls(TAGGED).finish_reason == "abort"
    assert _result(text, "length").with_tool_calls(TAGGED).finish_reason == "tool_calls"
    plain = _result("no calls here").with_tool_calls(TAGGED)
    assert plain.tool_calls is None and plain.finish_reason == "stop"
    assert _result(text).with_tool_calls(None).tool_calls is None


def test_a_cut_output_keeps_its_whole_calls():
    """max_tokens stopped a constrained array (or a tagged block) mid-call: the whole calls before it count,
    and only then: the same text that ended by itself is not calls."""
    cut_array = ('[{"name": "get_weather", "arguments": {"city": "Oslo"}}, \n'
                 '{"name": "get_time", "arguments": {"tz": "CET"}}, {"name": "get_w')
    assert parse_tool_calls(cut_array, JSON) is None
    parsed = parse_tool_calls(cut_array, JSON, cut=True)
    assert [c.function.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert parse_tool_calls('[{"name": "get_wea', JSON) is None
    cut_tagged = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
                  '<tool_call>{"name": "get_weather", "argu')
    assert parse_tool_calls(cut_tagged, TAGGED) is None
    assert [c.function.name for c in parse_tool_calls(cut_tagged, TAGGED, cut=True).calls] == ["get_time"]
    result = _result(cut_array, "length").with_tool_calls(JSON)
    assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 2
    assert _result(cut_array, "stop").with_tool_calls(JSON).tool_calls is None


@pytest.mark.parametrize("text, arguments", [
    ('{"name": "get_weather", "arguments": {"ci', '{"ci'),
    ('[{"name": "get_weather", "arguments": {"city": "Par', '{"city": "Par'),
    ('{"name": "get_weather",', ""),
    ('[{"name": "get_wea', ""),  # cut in the name: the grammar allows only offered names, one fits
    ('{"name": "get_w', ""),
])
def test_a_forced_call_cut_before_any_was_whole_is_a_call_with_its_cut_arguments(text, arguments):
    """A forced call (the JSON form) is all the output may be: cut at max_tokens it came back as content in
    tokenq's own {"name", "arguments"} wrapper. vLLM gives the call, its arguments as far as they got, and
    finish_reason "length"."""
    result = _result(text, "length").with_tool_calls(JSON)
    assert result.finish_reason == "length" and result.content is None
    assert [(c.function.name, c.function.arguments) for c in result.tool_calls] == [("get_weather", arguments)]
    assert _result(text, "stop").with_tool_calls(JSON).tool_calls is None


@pytest.mark.parametrize("stop_reason", ["}", "Paris", 23597])
def test_a_forced_call_cut_by_a_stop_string_or_token_is_a_call_too(stop_reason):
    """A stop string or a stop token cuts a forced call as max_tokens does: OpenAI answers a forced
    tool_choice with a call whatever ended it, so the cut call is given, not its JSON as content."""
    text = '{"name": "get_weather", "arguments": {"city": "Par'
    result = _result(text, "stop").model_copy(update={"stop_reason": stop_reason}).with_tool_calls(JSON)
    assert result.content is None and result.finish_reason == "stop"
    assert [(c.function.name, c.function.arguments) for c in result.tool_calls] == [("get_weather", '{"city": "Par')]


@pytest.mark.parametrize("text, names, name", [
    ('{"name": "get_', ["get_weather", "get_time"], None),  # two offered names fit: no call to name
    ('{"name": "', ["get_weather", "get_time"], None),
    ('{"na', ["get_weather", "get_time"], None),
    ('{"na', ["get_weather"], "get_weather"),  # a named tool_choice: the one function
    ('[{', ["get_weather"], "get_weather"),
    ('{"name": "', ["get_weather"], "get_weather"),
    ('{"name": "x', ["get_weather"], None),  # not a beginning of the offered name
    ('{"arguments', ["get_weather"], None),  # not the call's opening
])
def test_a_forced_call_cut_before_its_name_closed_is_the_one_function_that_fits(text, names, name):
    """OpenAI names a forced call however short max_tokens is; the text cut in the name stays content only
    where more than one offered function could still be meant."""
    spec = ToolParsing(names=names, form="json")
    result = _result(text, "length").with_tool_calls(spec)
    if name is None:
        assert result.tool_calls is None and result.text == text  # the text stays, as content
    else:
        assert result.content is None and result.finish_reason == "length"
        assert [(c.function.name, c.function.arguments) for c in result.tool_calls] == [(name, "")]


@pytest.mark.parametrize("form, wrap", [("json", "{}"), ("tagged", "x <tool_call>{}</tool_call>")])
def test_output_nested_past_the_json_parser_stays_plain_content(form, wrap):
    """A model can write JSON nested deeper than json.loads goes (RecursionError, no ValueError): the worker
    parsing it must not raise, and the text stays content."""
    deep = '{"name": "f", "arguments": ' + "[" * 5000 + "]" * 5000 + "}"
    text = wrap.format(deep)
    assert parse_tool_calls(text, ToolParsing(names=["f"], form=form)) is None
    assert parse_tool_calls(text[:-200], ToolParsing(names=["f"], form=form), cut=True) is None
