"""Messages and tools as a chat template receives them.

A template that reads `tools` (Qwen 2.5, Hermes, Llama 3.1, ...) gets them as transformers'
`apply_chat_template(tools=...)` passes them: the tool list, assistant messages with `tool_calls` (their
arguments as objects, as those templates expect) and `tool` messages with their `tool_call_id`.
A template without tool support (smollm2's) gets the Hermes format written into plain messages instead:
the tools and the calling instructions appended to the system message, earlier calls as `<tool_call>`
blocks in the assistant's text, and tool results as `<tool_response>` blocks in one user turn per run of
tool messages (so templates that insist on alternating roles still render). docs/tools.md shows it."""

from __future__ import annotations

import json
from typing import Any

from protocol.jobs import ChatMessage, MessageToolCall
from protocol.json_text import parse_json
from protocol.tools import TAG_CLOSE, TAG_OPEN

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    f"{TAG_OPEN}{TAG_CLOSE} XML tags:\n"
    f'{TAG_OPEN}\n{{{{"name": <function-name>, "arguments": <args-json-object>}}}}\n{TAG_CLOSE}'
)


def _arguments(text: str) -> Any:
    """A call's arguments as an object when they are JSON (templates write them with tojson), else as sent."""
    try:
        return parse_json(text)
    except ValueError:
        return text


def native_message(message: ChatMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        d["name"] = message.name
    if message.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": c.type,
                            "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                           for c in message.tool_calls]
    if message.tool_call_id is not None:
        d["tool_call_id"] = message.tool_call_id
    return d


def tools_block(tools: list[dict[str, Any]]) -> str:
    return FALLBACK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_block(call: MessageToolCall) -> str:
    body = {"name": call.function.name, "arguments": _arguments(call.function.arguments)}
    return f"{TAG_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TAG_CLOSE}"


def fallback_messages(messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Plain role/content messages carrying the tools, calls and results in the Hermes format."""
    out: list[dict[str, Any]] = []
    results_turn = False  # the last message out is a user turn of tool results
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if results_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results_turn = True
            continue
        results_turn = False
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["content"] = "\n".join([*([d["content"]] if d["content"] else []),
                                      *(call_block(c) for c in m.tool_calls)])
        out.append(d)
    if tools:
        block = tools_block(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
