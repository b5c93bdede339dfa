"""What the gateway refuses before the grammar engine could misread it (gateway/schema_rules.py), and, with
xgrammar itself, why: each refused rule is one the engine lets an output break."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ApiError
from gateway.guided import requested_guided
from gateway.schema_rules import Refused, check_regex, check_schema
from gateway.schemas import ChatCompletionRequest, ToolDef
from gateway.tools import plan_tools

STR = {"type": "string"}


@pytest.mark.parametrize("schema, needle", [
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7, "maximum": 100}}},
     "`multipleOf` at /properties/n"),
    ({"type": "number", "multipleOf": 0.5}, "`multipleOf` at the root"),
    ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}, "`uniqueItems` at the root"),
    ({"type": "array", "contains": {"const": 42}}, "`contains`"),
    ({"required": ["a"], "if": {"required": ["a"]}, "then": {"required": ["zz"]}}, "`if`"),
    ({"type": "integer", "not": {"const": 3}}, "`not`"),
    ({"allOf": [{"required": ["a"]}, {"required": ["b"]}]}, "`allOf` of several schemas"),
    ({"$defs": {"A": {"type": "array", "uniqueItems": True}}, "$ref": "#/$defs/A"}, "`uniqueItems` at /$defs/A"),
    ({"type": "object", "properties": {"p": {**STR, "pattern": "^C:\\\\[a-z]{1,5}$"}}}, "'\\\\' cannot be matched"),
    ({**STR, "pattern": '^a"b$'}, "'\"' cannot be matched"),
    ({**STR, "pattern": "^a\\tb$"}, "'\\t' cannot be matched"),
    ({**STR, "pattern": "^(?=a)a$"}, "`(?=` at offset 1"),
    ({"$ref": "#/$defs/nope"}, "'#/$defs/nope' does not resolve"),
    ({"$ref": "https://example.com/s.json"}, "does not resolve"),
    ({"type": "integer", "minimum": 1.5}, "`minimum` at the root bounds an integer"),
    ({**STR, "minLength": 5, "maxLength": 2}, "`minLength` at the root is above `maxLength`"),
    ({"enum": []}, "`enum` at the root is empty"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1},
     "`maxProperties` at the root is 1, under the 2 required"),
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "not a valid JSON Schema at properties/a/type"),
    ({**STR, "format": "ipv4", "maxLength": 8}, "`maxLength` beside `format` at the root"),
    ({**STR, "pattern": "^[a-z]+$", "minLength": 3}, "`minLength` beside `pattern` at the root"),
    ({**STR, "format": "date", "pattern": "^1999-"}, "`pattern` beside `format` at the root"),
    ({"type": "integer", "enum": [1, 2, 3], "minimum": 2}, "`minimum` beside `enum` at the root"),
    ({**STR, "const": "abc", "maxLength": 2}, "`maxLength` beside `const` at the root"),
    ({"type": "integer", "enum": ["a", "b"]}, "`enum` at the root holds 'a', which is not of `type` 'integer'"),
    ({"$defs": {"i": {"type": "integer"}}, "properties": {"e": {"$ref": "#/$defs/i", "maximum": 3}}},
     "`maximum` beside `$ref` at /properties/e"),
    ({"allOf": [{"type": "integer", "maximum": 100}], "maximum": 3}, "`maximum` beside `allOf` at the root"),
    ({"type": "object", "anyOf": [{"type": "integer"}]}, "`type` beside `anyOf` at the root"),
    ({"type": "object", "required": ["a"]}, "`required` at the root names 'a', which `properties` does not"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"], "additionalProperties": False},
     "names 'b'"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a"], "dependentRequired": {"a": ["b"]}},
     "`dependentRequired` at the root is not enforced"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "leave no integer between them"),
    ({"type": "integer", "minimum": 1, "exclusiveMaximum": 1}, "leave no integer between them"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "leave no number between them"),
    ({"type": "integer", "minimum": -1e300}, "`minimum` at the root is past the 64-bit integers"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 2, "additionalProperties": False},
     "`minProperties` at the root is 2, over the 1 properties"),
    (json.loads('{"type": "array", "items": ' * 400 + "{}" + "}" * 400), "nests deeper than 64 levels"),
])
def test_a_rule_the_engine_cannot_hold_an_output_to_is_refused_saying_where(schema, needle):
    with pytest.raises(Refused) as e:
        check_schema(schema)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"if": STR, "not": STR, "multipleOf": STR}, "required": ["if"]},
    {"allOf": [{"type": "integer"}]},
    {"type": "integer", "multipleOf": 7},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
    {**STR, "pattern": "^[^\\n\"]+$"},
    {**STR, "pattern": "^\\d{3}-\\d{4}$"},
    {"$defs": {"A": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}},
    {"type": "string", "enum": ["a", "b"], "title": "Colour"},  # pydantic's enum
    {"type": "integer", "const": 3},
    {"type": ["integer", "string"], "enum": [1, "a"]},
    {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None, "title": "N"},
    {"$defs": {"i": {"type": "integer"}}, "properties": {"e": {"$ref": "#/$defs/i", "description": "d"}}},
    {**STR, "format": "date"},
    {**STR, "minLength": 2, "maxLength": 3},
    {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 3},
    {"type": "number", "minimum": 1, "maximum": 1},
    {"type": "object", "properties": {"a": {}}, "required": ["a"], "minProperties": 1, "additionalProperties": False},
    json.loads('{"type": "array", "items": ' * 60 + "{}" + "}" * 60),
])
def test_what_the_engine_enforces_passes(schema):
    check_schema(schema)


def test_the_one_multiple_of_that_passes_is_enforced():
    assert _accepts({"type": "integer", "multipleOf": 7}, "14")
    assert not _accepts({"type": "integer", "multipleOf": 7}, "12")


@pytest.mark.parametrize("regex, needle", [
    ("(a)\\1", "backreference"), ("\\bfoo", "word boundary"), ("(?P<n>a)", "`(?P`"), ("(?i)ab", "`(?i`"),
    ("a*+", "possessive"), ("\\p{L}", "not a valid regular expression"), ("(a", "not a valid regular expression"),
])
def test_regex_syntax_the_engine_does_not_read_is_refused(regex, needle):
    with pytest.raises(Refused, match=None) as e:
        check_regex(regex)
    assert needle in str(e.value)


@pytest.mark.parametrize("regex", ["(?:ab)+c", "[(?]x", "\\(?x", "[a-z]+@[a-z]+\\.com", "a*?b", 'say "hi"\\t'])
def test_regex_syntax_the_engine_reads_passes(regex):
    check_regex(regex)  # outside a JSON string, quotes and tabs are plain text


def test_the_gateway_names_the_field_and_the_place():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "n": {"type": "integer", "multipleOf": 7, "minimum": 0}}}}})
    with pytest.raises(ApiError) as e:
        requested_guided(body)
    assert e.value.status == 400 and e.value.param == "response_format"
    assert str(e.value).startswith("response_format: `multipleOf` at /properties/n is not enforced")


def test_a_tools_parameters_are_checked_as_a_schema():
    tool = ToolDef.model_validate({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}, "required": ["a"]}}})
    with pytest.raises(ApiError) as e:
        plan_tools([tool], "auto", None, chat=True)
    assert e.value.status == 400 and "tools[0].function.parameters: not a valid JSON Schema" in str(e.value)


# -- why: what xgrammar itself lets through -------------------------------------------------------------

xgr = pytest.importorskip("xgrammar")


def _accepts(schema: dict, text: str) -> bool:
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "),
                                           strict_mode=True)
    return _is_grammar_accept_string(grammar, text)


@pytest.mark.parametrize("schema, breaking", [
    ({"type": "integer", "multipleOf": 7, "maximum": 100}, "12"),
    ({"type": "number", "multipleOf": 0.5}, "1.3"),
    ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}, "[1, 1]"),
    ({"type": "integer", "not": {"const": 3}}, "3"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, '"x"'),
    ({"type": "string", "pattern": "^C:\\\\[a-z]$"}, '"C:\\a"'),  # not JSON: a lone backslash escapes "a"
    ({"type": "string", "pattern": '^a"b$'}, '"a"b"'),
    ({"type": "string", "format": "ipv4", "maxLength": 8}, '"192.168.192.192"'),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcdef"'),
    ({"type": "string", "format": "date", "pattern": "^1999-.*$"}, '"2022-01-22"'),
    ({"type": "integer", "enum": [1, 2, 3], "minimum": 2}, "1"),
    ({"type": "integer", "enum": ["a", "b"]}, '"a"'),
    ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "maximum": 3}, "50"),
    ({"type": "object", "anyOf": [{"type": "integer"}]}, "1"),
    ({"type": "object", "required": ["a"]}, "{}"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"],
      "dependentRequired": {"a": ["b"]}, "additionalProperties": False}, '{"a": 1}'),
])
def test_each_refused_rule_is_one_the_engine_lets_an_output_break(schema, breaking):
    """If xgrammar comes to enforce one of these, this fails: its rule in schema_rules can go."""
    assert _accepts(schema, breaking)
    with pytest.raises(Refused):
        check_schema(schema)


@pytest.mark.parametrize("pattern", ["^[^\\n]+$", "^[ -~]+$", "^a.b$", "^\\S+$", "^(a|b)c$"])
def test_a_pattern_that_passes_never_lets_an_output_out_of_json(pattern):
    """The engine matches such a pattern inside the JSON string and never writes a raw quote, backslash
    or control character there."""
    schema = {"type": "string", "pattern": pattern}
    check_schema(schema)
    for text in ('"a"b"', '"a\\b"', '"\\"', '"a\tb"', '"a\nb"', '"ab\\"'):
        assert not _accepts(schema, text), text
