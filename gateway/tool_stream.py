"""Streaming a chat that was offered tools, as OpenAI streams it.

Content streams as it comes until a call may start; from there the text is held back. When the job ends,
its result says whether the held text was calls (the worker parsed them: protocol/tools.py): then the
calls go out as `delta.tool_calls` chunks (index, id, type and name first, then the arguments), else the
held text goes out as content. Held back: a tail that could begin `<tool_call>` and trailing whitespace
(the content before a call is right-trimmed), and with the json form (a constrained call) everything.
So the streamed content is always the non-streamed answer's content."""

from __future__ import annotations

from typing import Any

from protocol.jobs import Choice, JobResult
from protocol.tools import TAG_OPEN, ToolCall, ToolParsing


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that begins the tag (and is not the whole tag)."""
    for k in range(min(len(TAG_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(TAG_OPEN[:k]):
            return k
    return 0


class ToolStream:
    def __init__(self, spec: ToolParsing) -> None:
        self.held = ""
        self.in_call = spec.form == "json"  # a constrained output is the call from its first token

    def feed(self, text: str) -> str:
        """The content that can be sent now ("" when nothing can)."""
        self.held += text
        if self.in_call:
            return ""
        at = self.held.find(TAG_OPEN)
        if at >= 0:
            self.in_call = True
            cut = self.held[:at]
        else:
            cut = self.held[:len(self.held) - _partial_tag(self.held)]
        send = cut.rstrip()
        self.held = self.held[len(send):]
        return send

    def rest(self, result: JobResult | Choice) -> str:
        """The held text when the output held no calls: it was content after all."""
        return "" if result.tool_calls else self.held


def call_deltas(calls: list[ToolCall]) -> list[list[dict[str, Any]]]:
    """The `delta.tool_calls` of each chunk: per call, one naming it and one with its arguments."""
    deltas = []
    for i, call in enumerate(calls):
        deltas.append([{"index": i, "id": call.id, "type": "function",
                        "function": {"name": call.function.name, "arguments": ""}}])
        deltas.append([{"index": i, "function": {"arguments": call.function.arguments}}])
    return deltas
