"""OpenAI's request fields that tokenq does not implement (or not on every route). A client that sets one
expects its effect (a function call, a best-of-n chat answer); answering without it would be a quiet
wrong answer, so each is a 400 naming it. Absent, null and the field's own default are accepted."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from gateway.errors import ApiError
from gateway.schemas import SamplingFields


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _chat(req: SamplingFields) -> bool:
    return getattr(req, "messages", None) is not None


def _best_of_ok(v: Any, req: SamplingFields) -> bool:
    """best_of is a completion's (a prompt); a chat accepts only best_of equal to n."""
    return v is None or not _chat(req) or v == (req.n or 1)


# field -> (accepted when, what is accepted: for the message)
_RULES: dict[str, tuple[Callable[[Any, SamplingFields], bool], str]] = {
    "best_of": (_best_of_ok, "best_of is served for completions (a prompt) only; a chat accepts only n"),
    "functions": (lambda v, _: _empty(v), "deprecated by OpenAI and not served; use `tools`"),
    "function_call": (lambda v, _: v in (None, "none", "auto"), "deprecated by OpenAI and not served; use "
                                                                "`tool_choice`"),
    "suffix": (lambda v, _: _empty(v), "suffix (insertion) is not supported"),
    "modalities": (lambda v, _: v is None or v == ["text"], 'only the "text" modality is supported'),
    "audio": (lambda v, _: v is None, "audio output is not supported"),
    "prediction": (lambda v, _: v is None, "predicted outputs are not supported"),
    "use_beam_search": (lambda v, _: v in (None, False), "beam search is not supported"),
    # vLLM's: a per-request template, prompt truncation, a chat's echo, token allow/deny lists, RAG documents,
    # prompt logprobs and detokenization options.
    "chat_template": (lambda v, _: _empty(v), "a per-request chat template is not supported; the model's own "
                                              "template renders the chat"),
    "truncate_prompt_tokens": (lambda v, _: v is None, "prompt truncation is not supported; send the part "
                                                       "of the prompt to keep"),
    "echo": (lambda v, req: v in (None, False) or not _chat(req),
             "echo is served for completions (a prompt) only"),
    "allowed_token_ids": (lambda v, _: v is None, "allowed_token_ids is not supported; use logit_bias"),
    "bad_words": (lambda v, _: _empty(v), "bad_words is not supported; use logit_bias"),
    "documents": (lambda v, _: _empty(v), "documents for the chat template are not supported"),
    "prompt_logprobs": (lambda v, _: v is None, "prompt_logprobs is not supported; a completion with "
                                                "`echo: true` and `logprobs` returns the prompt's logprobs"),
    "return_tokens_as_token_ids": (lambda v, _: v in (None, False), "tokens are returned as text only"),
    "skip_special_tokens": (lambda v, _: v in (None, True), "special tokens are always left out of the text"),
    "spaces_between_special_tokens": (lambda v, _: v in (None, True), "not supported other than true"),
    # Set alone, these would do nothing (OpenAI and vLLM refuse them too).
    "top_logprobs": (lambda v, req: v is None or not _chat(req) or getattr(req, "logprobs", None) not in (None, False),
                     "top_logprobs needs `logprobs: true` on a chat"),
    "stream_options": (lambda v, req: v is None or getattr(req, "stream", False),
                       "stream_options needs `stream: true`"),
}


def _as_json(value: Any) -> str:
    """The value as the client wrote it (JSON), not as Python shows it."""
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_unset=True)
    return json.dumps(value, ensure_ascii=False, default=str)


def check_unsupported(req: SamplingFields) -> None:
    """400 naming the first field that is set to something tokenq would ignore."""
    for name, (accepted, why) in _RULES.items():
        value = getattr(req, name, None)
        if not accepted(value, req):
            shown = _as_json(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ApiError(400, f"{name}: {why} (got {shown})", param=name, code="unsupported_field")

