"""Structured-output fields → one GuidedSpec on SamplingParams, and the 400s that name the client's field."""

from __future__ import annotations

import functools
import json

import pytest
from pydantic import ValidationError

from gateway.errors import ApiError
from gateway.guided import requested_guided, wants_guided
from gateway.sampling import to_sampling
from gateway.schemas import ChatCompletionRequest, CompletionRequest, JobCreate
from gateway.unsupported import check_unsupported
from protocol.guided import GuidedSpec
from protocol.jobs import JobPayload
from respcache.scope import exact_id

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=MSG, **kw)


@pytest.mark.parametrize("kw, spec", [
    ({"response_format": {"type": "json_object"}}, GuidedSpec(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     GuidedSpec(json_schema=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, GuidedSpec(json_object=True)),
    ({"guided_json": SCHEMA}, GuidedSpec(json_schema=SCHEMA)),
    ({"guided_json": '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'},
     GuidedSpec(json_schema=SCHEMA)),
    ({"guided_regex": "[0-9]{3}"}, GuidedSpec(regex="[0-9]{3}")),
    ({"guided_choice": ["yes", "no"]}, GuidedSpec(choice=["yes", "no"])),
    ({"guided_grammar": 'root ::= "a"'}, GuidedSpec(grammar='root ::= "a"')),
    ({"structured_outputs": {"choice": ["x", "y"]}}, GuidedSpec(choice=["x", "y"])),
    ({"structured_outputs": {"json": SCHEMA, "disable_fallback": False}}, GuidedSpec(json_schema=SCHEMA)),
])
def test_each_field_maps_onto_one_spec(kw, spec):
    req = chat(**kw)
    check_unsupported(req)  # none of them is refused any more
    assert wants_guided(req)
    got = requested_guided(req)
    assert got == spec
    assert to_sampling(req, 1, 100, "messages", guided=got).guided == spec


def test_text_and_nothing_mean_no_constraint():
    assert requested_guided(chat(response_format={"type": "text"})) is None
    assert not wants_guided(chat()) and requested_guided(chat()) is None
    assert to_sampling(chat(), 1, 100, "messages").guided is None


def test_jobs_take_the_engine_spec_directly_and_completions_the_vllm_fields():
    job = JobCreate(model="m", prompt="x", guided={"regex": "a+"})
    assert requested_guided(job) == GuidedSpec(regex="a+")
    comp = CompletionRequest(model="m", prompt="x", guided_choice=["a"])
    assert requested_guided(comp) == GuidedSpec(choice=["a"])


@pytest.mark.parametrize("kw, param, needle", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "at most one"),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"response_format": {"type": "xml"}}, "response_format", "one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format", "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format", "is an object"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[" * 100_000 + "]" * 100_000}, "guided_json", "nests deeper than the JSON parser goes"),
    ({"guided_json": '{"enum": ["\\ud800"]}'}, "guided_json", "contains a lone surrogate in enum.0"),
    ({"guided_json": {"type": "string", "pattern": "(("}}, "guided_json", "not a valid JSON Schema"),
    ({"guided_regex": "(a"}, "guided_regex", "not a valid regular expression"),
    ({"guided_choice": []}, "guided_choice", "at least one choice"),
    ({"guided_choice": [""]}, "guided_choice", "1 to 1024 characters"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag not supported"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
])
def test_bad_constraints_are_400_naming_the_field(kw, param, needle):
    with pytest.raises(ApiError) as e:
        requested_guided(chat(**kw))
    assert e.value.status == 400 and e.value.param == param, (e.value.param, str(e.value))
    assert needle in str(e.value), str(e.value)


def test_a_constraint_nested_deeper_than_json_dumps_goes_is_refused_with_the_request():
    """5,000 levels: json.dumps raises RecursionError on it (a 500 once); the one rule for a client's JSON
    values (protocol/text.encodable_json) refuses it as the request is read, naming the field."""
    with pytest.raises(ValidationError) as e:
        chat(guided_json={"enum": functools.reduce(lambda v, _: [v], range(5_000), [])})
    [error] = e.value.errors()
    assert error["loc"] == ("guided_json",) and "nests deeper than 128 levels" in error["msg"], error


@pytest.mark.parametrize("body, message", [
    ({"guided_choice": []}, "guided_choice: at least one choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice: each choice is 1 to 1024 characters"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice: at least one choice"),
    ({"structured_outputs": {"json": {"type": "string", "description": "x" * 70_000}}},
     "structured_outputs.json: at most 64000 characters of JSON"),
    ({"guided_json": {"type": "string", "description": "x" * 70_000}}, "guided_json: at most 64000 characters of JSON"),
])
def test_a_constraint_error_names_the_key_the_client_wrote_once(body, message):
    with pytest.raises(ApiError) as e:
        requested_guided(chat(**body))
    assert str(e.value) == message


def test_the_exact_cache_key_tells_constraints_apart():
    def key(guided):
        sampling = to_sampling(chat(temperature=0), 1, 100, "messages", guided=guided)
        payload = JobPayload(id="j", model="m", kind="chat", prompt_token_ids=[1, 2], sampling=sampling)
        return exact_id(payload, "card")

    keys = {key(None), key(GuidedSpec(json_object=True)), key(GuidedSpec(json_schema=SCHEMA)),
            key(GuidedSpec(choice=["a", "b"])), key(GuidedSpec(choice=["b", "a"]))}
    assert len(keys) == 5
    assert key(GuidedSpec(json_schema=SCHEMA)) == key(GuidedSpec(json_schema=dict(reversed(SCHEMA.items()))))


def test_batch_lines_carry_the_constraint_to_the_same_mapping():
    from batches.lines import parse_line

    body = {"model": "m", "messages": MSG, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    line = parse_line(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}), 1)
    assert requested_guided(line.request()) == GuidedSpec(json_schema=SCHEMA)
    other = parse_line(json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {**body, "response_format": {"type": "json_object"}}}), 2)
    assert line.dedup_digest() != other.dedup_digest()  # identical-request dedup tells them apart
