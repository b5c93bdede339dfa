"""Tool calls in OpenAI's shape, and the one parser that finds them in generated text.

Two output forms are parsed (docs/tools.md):
- tagged (`tool_choice: "auto"`): Hermes' `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks after optional text; that text is the message's content.
- json (`"required"` or a named function, where a grammar constrains the output): the whole output is one
  `{"name", "arguments"}` object or an array of them.
Output that does not parse as calls of offered functions stays plain content: a half-written call is
text the client can read, not an error.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"
MAX_TOOLS = 128


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolParsing(BaseModel):
    """What the worker parses a chat's output for: the offered functions' names and the output form."""

    names: list[str] = Field(max_length=MAX_TOOLS)
    form: Literal["tagged", "json"] = "tagged"
    parallel: bool = True  # False: only the first call is kept


@dataclass(frozen=True)
class ParsedTools:
    content: str | None  # the text before the calls; None when there is none
    calls: list[ToolCall]
    whole: bool = True  # False: the one call is half-written (a forced call cut before it closed)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def content_before(text: str) -> str:
    """The content a tagged output shows before its first call: everything before the tag, right-trimmed
    (the newline a model writes before the tag is not content). The streaming path uses the same rule."""
    at = text.find(TAG_OPEN)
    return (text if at < 0 else text[:at]).rstrip()


def parse_tool_calls(text: str, spec: ToolParsing, cut: bool = False) -> ParsedTools | None:
    """The calls in `text`, or None when it holds no well-formed call of an offered function. `cut`: the
    output stopped before it ended by itself (max_tokens, a stop string, a stop token), so its last call may
    be half-written: the whole calls before it count.
    Output nested deeper than Python's JSON parser and encoder go stays plain content too."""
    try:
        return _parse(text, spec, cut)
    except RecursionError:
        return None


def _parse(text: str, spec: ToolParsing, cut: bool) -> ParsedTools | None:
    if spec.form == "json":
        value = _loads(text.strip())
        if value is None and cut:
            value = _whole_items(text.strip())
        calls = _calls_of(value, spec.names)
        content = None
        if not calls and cut:  # a forced call is all the output may be: its cut arguments, as vLLM's
            half = _half_call(text.strip(), spec.names)
            return ParsedTools(None, [half], whole=False) if half else None
    else:
        if TAG_OPEN not in text:
            return None
        calls = _tagged(text, spec.names, cut)
        content = content_before(text) or None
    if not calls:
        return None
    return ParsedTools(content, calls if spec.parallel else calls[:1])


def _tagged(text: str, names: list[str], cut: bool = False) -> list[ToolCall] | None:
    """Every block must parse, or none counts (but a cut output's unclosed last block is left out). An
    unclosed last block is accepted when its JSON is whole (a model that stops at its end-of-turn token
    before the closing tag); text between and after the blocks is not content (OpenAI's content is what
    comes before the calls)."""
    calls: list[ToolCall] = []
    at = text.find(TAG_OPEN)
    while at >= 0:
        start = at + len(TAG_OPEN)
        end = text.find(TAG_CLOSE, start)
        block = text[start:] if end < 0 else text[start:end]
        found = _calls_of(_loads(block.strip()), names)
        if not found:
            return (calls or None) if cut and end < 0 else None
        calls += found
        at = -1 if end < 0 else text.find(TAG_OPEN, end + len(TAG_CLOSE))
    return calls


_HALF_CALL = re.compile(r'\[?\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*(?:,\s*"(?:arguments|parameters)"\s*:\s*(.*))?',
                        re.DOTALL)


_NAME_BEGUN = re.compile(r'\[?\s*\{\s*"name"\s*:\s*"([^"\\]*)$')


def _half_call(text: str, names: list[str]) -> ToolCall | None:
    """The first call of a forced output cut before it closed: its name, and its arguments' JSON text as far
    as it got (empty when they had not begun). Cut before its name closed, the call is the one offered function
    that the name's beginning fits (the grammar allows only offered names), as OpenAI names a forced call
    however short max_tokens is."""
    match = _HALF_CALL.match(text)
    if match is not None:
        name, arguments = match.group(1), match.group(2) or ""
    else:
        begun = _NAME_BEGUN.match(text)
        opening = "".join(text.split())
        if begun is None and not ('[{"name":"'.startswith(opening) or '{"name":"'.startswith(opening)):
            return None
        fits = [n for n in names if n.startswith(begun.group(1) if begun else "")]
        name, arguments = (fits[0] if len(fits) == 1 else ""), ""
    if name not in names:
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def _whole_items(text: str) -> list[Any] | None:
    """The complete items at the start of a JSON array cut short (None when there are none)."""
    if not text.startswith("["):
        return None
    decoder, items, at = json.JSONDecoder(), [], 1
    while True:
        while at < len(text) and text[at] in " \t\n\r":
            at += 1
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError:
            return items or None
        items.append(item)
        while at < len(text) and text[at] in " \t\n\r":
            at += 1
        if at >= len(text) or text[at] != ",":
            return items or None
        at += 1


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _calls_of(value: Any, names: list[str]) -> list[ToolCall] | None:
    """A `{"name", "arguments"}` object (or "parameters", as Llama 3.1 writes it) or a non-empty array of
    them, naming offered functions with object arguments (or a string holding one)."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = _loads(args)
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(id=new_call_id(),
                              function=FunctionCall(name=item["name"], arguments=json.dumps(args, ensure_ascii=False))))
    return calls or None
