"""A job as it travels: the request the gateway validated, its state, and its result."""

from __future__ import annotations

import enum
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from protocol import keys
from protocol.sampling import SamplingParams
from protocol.text import EncodableJson, Text, text_up_to
from protocol.tools import ToolCall, ToolParsing, parse_tool_calls

UNSUPPORTED = "unsupported_field"  # a validation error of this type is a feature tokenq does not serve


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.expired})

Lane = Literal["interactive", "default", "batch"]
JobKind = Literal["chat", "completion"]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


def new_job_id(model: str) -> str:
    """A fresh id for a job of `model`: it carries the model's shard (protocol/keys.py)."""
    return keys.new_job_id(model, uuid.uuid4().hex)


class ContentPart(BaseModel):
    """One part of OpenAI's list-of-parts content. Only text is served: an image or audio part would be
    dropped from the prompt without a word, so it is refused instead."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = Field(default=None, validate_default=True)  # required of a text part (_text_needed)
    __pydantic_extra__: dict[str, EncodableJson] = Field(init=False)  # kept in the stored request

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":  # its own error type: the gateway answers it with code unsupported_field
            raise PydanticCustomError(UNSUPPORTED, "only text content parts are supported (got {got})",
                                      {"got": repr(v[:40])})
        return v

    @field_validator("text")
    @classmethod
    def _text_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("type") == "text":  # a refused type says what it is instead
            raise ValueError("a text part needs its text")
        return v


class MessageFunction(BaseModel):
    name: text_up_to(64)
    arguments: Text = "{}"


class MessageToolCall(BaseModel):
    """A call in an assistant message the client sends back: OpenAI's shape, `arguments` a JSON string."""

    id: text_up_to(256)
    type: Literal["function"] = "function"
    function: MessageFunction


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=128)  # assistant messages
    tool_call_id: text_up_to(256) | None = None  # tool messages: the call answered

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry them (this one is {self.role!r})")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    @field_validator("content")
    @classmethod
    def _content_given(cls, v: str | list[ContentPart] | None, info: ValidationInfo) -> str | list[ContentPart] | None:
        role = info.data.get("role")  # absent when the role was refused: that error says enough
        if v is None and role not in (None, "assistant"):  # only an assistant's may be null (tool calls)
            raise ValueError(f"a {role} message needs content (a string or a list of text parts)")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of parts; send at least one text part, or a string")
        return v

    def text(self) -> str:
        """Content as plain text; OpenAI's list-of-parts form is joined by newlines, as vLLM joins it."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)


class JobPayload(BaseModel):
    """What a worker needs to run a job: the prompt already rendered and tokenized by the gateway."""

    id: str
    model: str
    kind: JobKind
    lane: Lane = "default"
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool = False  # publish deltas as they come (someone is reading them)
    tenant: str = "default"
    enqueued_at: float = Field(default_factory=time.time)
    echo_prompt: str | None = None  # completions' echo=true
    deadline: float | None = None  # epoch seconds; past it a queued job expires and a running one stops
    webhook_url: str | None = None  # where the final state is delivered (signed, retried)
    run_to_completion: bool = False  # a streaming client that disconnects does not cancel the job
    cache_fill: bool = False  # on success the worker fills the response cache (respcache.store.fill)
    tools: ToolParsing | None = None  # a chat offered tools: the worker parses its output for calls

    @property
    def cost_tokens(self) -> int:
        """Tokens the job may take (its tokens-per-minute cost): the prompt, max_tokens per sequence."""
        return len(self.prompt_token_ids) + self.sampling.num_sequences * self.sampling.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token: nothing comes before it to predict it
    top: list[tuple[int, str, float]] = Field(default_factory=list)


StopReason = str | int | None  # vLLM's: the stop string or stop token id that ended a choice; None for EOS, length


class Choice(BaseModel):
    """One of a job's n samples of its prompt."""

    index: int = 0
    text: str
    finish_reason: FinishReason
    stop_reason: StopReason = None
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None  # as JobResult's, for this choice's text
    content: str | None = None

    def with_tool_calls(self, spec: ToolParsing | None) -> Choice:
        update = _tool_update(self.text, self.finish_reason, self.stop_reason, spec)
        return self.model_copy(update=update) if update else self


def _tool_update(text: str, finish_reason: FinishReason, stop_reason: StopReason,
                 spec: ToolParsing | None) -> dict | None:
    """The calls `text` holds as fields to set; finish_reason "tool_calls" when the output ended by itself
    or was cut (at max_tokens, a stop string or a stop token: then a half-written last call is left out, and
    the calls given are whole), except for a forced call cut before any call was whole: that one call, its
    arguments cut, and the reason that cut it."""
    cut = finish_reason == "length" or stop_reason is not None
    parsed = parse_tool_calls(text, spec, cut=cut) if spec is not None else None
    if parsed is None:
        return None
    reason = "tool_calls" if finish_reason in ("stop", "length") and parsed.whole else finish_reason
    return {"tool_calls": parsed.calls, "content": parsed.content, "finish_reason": reason}


class JobResult(BaseModel):
    """The first choice's fields, the job's usage (every choice's tokens) and, with n > 1, every choice."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    # With sampling.prompt_logprobs: one per prompt token, the first with logprob None.
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_reason: StopReason = None
    # With n > 1: every choice, index 0 to n - 1; the fields above repeat choice 0 for readers of one.
    choices: list[Choice] | None = None
    # With payload.tools and calls parsed from `text`: the calls, and the message content (the text before
    # them, None when none). `text` stays the raw output (logprob offsets count on it).
    tool_calls: list[ToolCall] | None = None
    content: str | None = None

    def all_choices(self) -> list[Choice]:
        if self.choices:
            return self.choices
        return [Choice(text=self.text, finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                       token_ids=self.token_ids, logprobs=self.logprobs, tool_calls=self.tool_calls,
                       content=self.content)]

    def with_tool_calls(self, spec: ToolParsing | None) -> JobResult:
        """This result with the calls its text holds (see _tool_update); with several choices each with its
        own, and the fields above those of choice 0 (the same calls, their ids included)."""
        if spec is None:
            return self
        if not self.choices:
            update = _tool_update(self.text, self.finish_reason, self.stop_reason, spec)
            return self.model_copy(update=update) if update else self
        choices = [c.with_tool_calls(spec) for c in self.choices]
        first = choices[0]
        return self.model_copy(update={"choices": choices, "tool_calls": first.tool_calls, "content": first.content,
                                       "finish_reason": first.finish_reason})


class JobError(BaseModel):
    type: str  # "invalid_request_error" where the request is at fault (a 400), else the server's (a 500)
    message: str
    # OpenAI's code where one applies (context_length_exceeded); else the type stands. Left out when None.
    code: str | None = Field(default=None, exclude_if=lambda code: code is None)
