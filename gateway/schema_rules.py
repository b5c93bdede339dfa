"""What the grammar engine (xgrammar, worker/engine/guided.py) can hold an output to, checked at the gateway:
a constraint it would misread is a 400 that says where, not a failed job, nor an output that breaks it.

- JSON Schema keywords it does not enforce (`uniqueItems`, `contains`, `if`, `not`, an `allOf` of several
  schemas, `multipleOf` but of an unbounded integer, ...) are refused: the output would pass them by.
- Its regexes have no lookaround, backreference, word boundary, named group, inline flag or possessive
  quantifier.
- A schema `pattern` whose literal is a quote, backslash or control character is refused: the engine writes
  such a literal raw inside the JSON string, which is then not JSON.
- Where one keyword decides, the engine drops its siblings: beside `enum`, `const`, `$ref`, `anyOf`,
  `oneOf` and `allOf` no other assertion is enforced (beside `enum` and `const`, a `type` their values all
  have is fine), nor a length beside a string's `format` or `pattern`, nor a `pattern` beside a `format`;
  and only declared properties can be `required`. Each is refused rather than dropped.
- A `$ref` resolves inside the schema, and bounds are not crossed (`minLength` above `maxLength`, an
  integer range with no integer in it, ...) nor past the engine's 64-bit integers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from protocol.text import encodable_json

MAX_SCHEMA_DEPTH = 64  # nested objects and arrays of a JSON value (a schema, template variables); deeper is refused
# before any walk, and well within the ~250 levels pydantic's encoder writes when the request is stored
NOT_ENFORCED = ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "if", "then", "else",
                "not", "dependentSchemas", "dependentRequired", "dependencies", "patternProperties",
                "propertyNames", "unevaluatedProperties", "unevaluatedItems")
# The keywords that constrain a value (the rest, title, description, default, examples, ..., annotate it).
_ASSERTIONS = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "minimum", "maximum", "exclusiveMinimum",
               "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "format", "items",
               "prefixItems", "minItems", "maxItems", "properties", "required", "additionalProperties",
               "minProperties", "maxProperties")
_DECIDERS = ("enum", "const", "$ref", "anyOf", "oneOf", "allOf")  # the keywords that take over a node
_INT64 = (-(2**63), 2**63 - 1)
_JSON_TYPES = {"string": (str,), "boolean": (bool,), "object": (dict,), "array": (list,), "null": (type(None),)}
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas", "patternProperties")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems")
_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
           ("minimum", "maximum"))
_JSON_ESCAPED = frozenset({ord('"'), ord("\\")}) | frozenset(range(0x20))


class Refused(ValueError):
    """A constraint the engine cannot hold an output to; the message says where and why."""


def check_schema(schema: dict[str, Any]) -> None:
    """Refused unless the schema is a valid JSON Schema (2020-12) whose every rule the engine enforces."""
    check_depth(schema)
    from jsonschema import Draft202012Validator, SchemaError  # imported on the first schema only

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise Refused(f"not a valid JSON Schema{' at ' + where if where else ''}: {e.message}") from e
    except RecursionError as e:  # within MAX_SCHEMA_DEPTH, $refs can still loop the meta-schema's walk
        raise Refused("too deeply nested to check") from e
    for path, node in _subschemas(schema, ""):
        where = path or "the root"
        for keyword in NOT_ENFORCED:
            if keyword in node and not (keyword == "uniqueItems" and node[keyword] is False) and not (
                    keyword == "multipleOf" and _integer_steps(node)):
                raise Refused(f"`{keyword}` at {where} is not enforced by the grammar engine, so an output could "
                              "break it; remove it")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise Refused(f"`allOf` of several schemas at {where} is not enforced by the grammar engine; merge them "
                          "into one schema")
        if isinstance(node.get("pattern"), str):
            try:
                check_regex(node["pattern"], in_json_string=True)
            except Refused as e:
                raise Refused(f"`pattern` at {where}: {e}") from None
        if isinstance(node.get("$ref"), str) and not _resolves(schema, node["$ref"]):
            raise Refused(f"`$ref` at {where}: {node['$ref']!r} does not resolve inside the schema (local "
                          "references only, such as '#/$defs/Name')")
        if node.get("enum") == []:
            raise Refused(f"`enum` at {where} is empty: no value could match")
        for low, high in _BOUNDS:
            if _number(node.get(low)) and _number(node.get(high)) and node[low] > node[high]:
                raise Refused(f"`{low}` at {where} is above `{high}` ({node[low]} > {node[high]})")
        _check_siblings(node, where)
        required = node.get("required")
        declared = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        if isinstance(required, list) and (missing := [r for r in required if r not in declared]):
            raise Refused(f"`required` at {where} names {missing[0]!r}, which `properties` does not declare: the "
                          "grammar engine requires declared properties only; declare it")
        if (node.get("additionalProperties") is False and _number(node.get("minProperties"))
                and node["minProperties"] > len(declared)):
            raise Refused(f"`minProperties` at {where} is {node['minProperties']}, over the {len(declared)} "
                          "properties it declares (and no others are allowed): no object could match")
        if isinstance(required, list) and _number(node.get("maxProperties")) and len(required) > node["maxProperties"]:
            raise Refused(f"`maxProperties` at {where} is {node['maxProperties']}, under the {len(required)} "
                          "required properties")
        if node.get("type") == "integer":
            for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if _number(node.get(bound)) and node[bound] != int(node[bound]):
                    raise Refused(f"`{bound}` at {where} bounds an integer, so it is a whole number "
                                  f"(got {node[bound]})")
        _check_ranges(node, where)


def _check_siblings(node: dict[str, Any], where: str) -> None:
    """Keywords the engine drops because another keyword of the node decides alone."""
    for decider in _DECIDERS:
        if decider not in node:
            continue
        allowed = ("type",) if decider in ("enum", "const") else ()
        others = [k for k in _ASSERTIONS if k in node and k != decider and k not in allowed]
        if others:
            raise Refused(f"`{others[0]}` beside `{decider}` at {where} is not enforced by the grammar engine (it "
                          f"holds the value to the `{decider}` alone); fold it into the `{decider}`")
        if decider in ("enum", "const") and "type" in node:
            values = node[decider] if decider == "enum" and isinstance(node[decider], list) else [node[decider]]
            for value in values:
                if not _of_type(value, node["type"]):
                    raise Refused(f"`{decider}` at {where} holds {value!r}, which is not of `type` "
                                  f"{node['type']!r}: the grammar engine would write it anyway")
    lengths = [k for k in ("minLength", "maxLength") if k in node]
    for shape in ("format", "pattern"):
        if shape in node and lengths:
            raise Refused(f"`{lengths[0]}` beside `{shape}` at {where} is not enforced by the grammar engine (it "
                          f"holds the string to the `{shape}` alone); "
                          + ("drop one of them" if shape == "format" else "write the length into the pattern"))
    if "format" in node and "pattern" in node:
        raise Refused(f"`pattern` beside `format` at {where} is not enforced by the grammar engine (it holds the "
                      "string to the `format` alone); drop one of them")


def _of_type(value: Any, types: Any) -> bool:
    for t in types if isinstance(types, list) else [types]:
        if t == "integer" and _number(value) and float(value).is_integer():
            return True
        if t == "number" and _number(value):
            return True
        if isinstance(value, _JSON_TYPES.get(t, ())) and not (t != "boolean" and isinstance(value, bool)):
            return True
    return False


def _check_ranges(node: dict[str, Any], where: str) -> None:
    """A numeric range with no value in it, or an integer bound past the engine's 64-bit integers."""
    low = next((k for k in ("minimum", "exclusiveMinimum") if _number(node.get(k))), None)
    high = next((k for k in ("maximum", "exclusiveMaximum") if _number(node.get(k))), None)
    if node.get("type") == "integer":
        for bound in (low, high):
            if bound is not None and not _INT64[0] <= node[bound] <= _INT64[1]:
                raise Refused(f"`{bound}` at {where} is past the 64-bit integers the grammar engine bounds an "
                              f"integer with (got {node[bound]})")
        if low is not None and high is not None:
            lo = node[low] + (1 if low == "exclusiveMinimum" else 0)
            hi = node[high] - (1 if high == "exclusiveMaximum" else 0)
            if lo > hi:
                raise Refused(f"`{low}` and `{high}` at {where} leave no integer between them")
    elif low is not None and high is not None and "exclusive" in low + high and node[low] >= node[high]:
        raise Refused(f"`{low}` and `{high}` at {where} leave no number between them")


def check_regex(regex: str, in_json_string: bool = False) -> None:
    """Refused unless the engine reads the regex as Python does. `in_json_string`: it is a schema's
    `pattern`, matched inside a JSON string."""
    _check_groups(regex)
    try:
        parsed = re._parser.parse(regex)  # type: ignore[attr-defined]  # the parse tree `re` compiles
    except re.error as e:
        raise Refused(f"not a valid regular expression: {e}") from e
    _check_nodes(parsed, in_json_string)


def check_depth(value: Any) -> None:
    """Refused when the JSON value nests deeper than MAX_SCHEMA_DEPTH (or holds text no encoder writes):
    protocol/text's walk of every JSON value a client sends, at the tighter bound."""
    try:
        encodable_json(value, MAX_SCHEMA_DEPTH)
    except ValueError as e:
        raise Refused(str(e)) from None


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in the schema, with its JSON pointer."""
    if not isinstance(node, dict):
        return
    yield path, node
    for keyword in _SCHEMA_MAPS:
        if isinstance(node.get(keyword), dict):
            for name, sub in node[keyword].items():
                yield from _subschemas(sub, f"{path}/{keyword}/{name}")
    for keyword in _SCHEMA_LISTS + ("items",):
        if isinstance(node.get(keyword), list):
            for i, sub in enumerate(node[keyword]):
                yield from _subschemas(sub, f"{path}/{keyword}/{i}")
    for keyword in _SCHEMA_ONE:
        yield from _subschemas(node.get(keyword), f"{path}/{keyword}")


def _resolves(schema: dict[str, Any], ref: str) -> bool:
    if not ref.startswith("#"):
        return False
    node: Any = schema
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, dict | bool)


def _integer_steps(node: dict[str, Any]) -> bool:
    """The one `multipleOf` the engine enforces: of an unbounded integer, by a whole number."""
    return (node.get("type") == "integer" and isinstance(node["multipleOf"], int)
            and not any(b in node for b in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_groups(regex: str) -> None:
    """`(?` opens only a plain non-capturing group `(?:...)` for the engine."""
    escaped = in_class = False
    for i, c in enumerate(regex):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(" and regex[i + 1:i + 2] == "?" and regex[i + 2:i + 3] != ":":
            raise Refused(f"`(?{regex[i + 2:i + 3]}` at offset {i}: the grammar engine reads no lookaround, named "
                          "group, inline flag, comment or atomic group; use (?:...) or (...)")


def _check_nodes(nodes: Any, in_json_string: bool) -> None:
    c = re._constants  # type: ignore[attr-defined]
    for op, av in nodes:
        if op is c.LITERAL and in_json_string and av in _JSON_ESCAPED:
            raise Refused(f"the literal {chr(av)!r} cannot be matched: the grammar engine would write it raw "
                          "inside the JSON string, which is then not valid JSON")
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            raise Refused("the grammar engine reads no backreference")
        elif op is c.AT and av in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY):
            raise Refused("the grammar engine reads no word boundary (\\b, \\B)")
        elif op is c.POSSESSIVE_REPEAT:
            raise Refused("the grammar engine reads no possessive quantifier (*+, ++, ?+)")
        elif op is c.SUBPATTERN:
            _check_nodes(av[3], in_json_string)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
            _check_nodes(av[2], in_json_string)
        elif op is c.BRANCH:
            for branch in av[1]:
                _check_nodes(branch, in_json_string)
