"""From a request's sampling fields to protocol SamplingParams, with errors that name the client's field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gateway.errors import ApiError, describe_validation_error
from gateway.schemas import SamplingFields
from protocol.sampling import SamplingParams

MAX_DEFAULT_TOKENS = 4096  # max_tokens when the client gives none: the rest of the context, up to this

_SAME_NAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
              "min_tokens", "ignore_eos", "stop_token_ids", "repetition_penalty", "stop")


def requested_max_tokens(req: SamplingFields) -> tuple[int | None, str]:
    """(max tokens the client asked for or None, the field it used)."""
    completion = getattr(req, "max_completion_tokens", None)
    if completion is not None:
        return completion, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def requested_logprobs(req: SamplingFields) -> int | None:
    """Chat: logprobs=true with top_logprobs=k; completions: logprobs=k."""
    logprobs = getattr(req, "logprobs", None)
    if logprobs is None or logprobs is False:
        return None
    if logprobs is True:
        return getattr(req, "top_logprobs", None) or 0
    return int(logprobs)


def check_n(req: SamplingFields) -> None:
    if req.n != 1:
        raise ApiError(400, f"n: only n=1 is supported (got {req.n})", param="n")


def to_sampling(req: SamplingFields, prompt_tokens: int, max_model_len: int, prompt_field: str) -> SamplingParams:
    """Validated SamplingParams; max_tokens checked against (or defaulted to) what the context leaves."""
    room = max_model_len - prompt_tokens
    asked, max_field = requested_max_tokens(req)
    if asked is not None and asked >= 1 and prompt_tokens + asked > max_model_len:
        raise ApiError(400, f"prompt has {prompt_tokens} tokens and {max_field} is {asked}, but the model's "
                            f"context is {max_model_len} tokens", param=max_field)
    if room <= 0:
        raise ApiError(400, f"prompt has {prompt_tokens} tokens, but the model's context is {max_model_len} "
                            "tokens: no room is left to generate", param=prompt_field)
    values: dict[str, Any] = {
        "max_tokens": asked if asked is not None else min(room, MAX_DEFAULT_TOKENS),
        "logprobs": requested_logprobs(req),
    }
    for name in _SAME_NAME:
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    try:
        return SamplingParams.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        message, param = describe_validation_error(err)
        if param == "max_tokens":
            message, param = message.replace("max_tokens", max_field, 1), max_field
        if param == "logprobs" and getattr(req, "top_logprobs", None) is not None:
            message, param = message.replace("logprobs", "top_logprobs", 1), "top_logprobs"
        if param is None:  # a cross-field rule; its message names the fields
            message = message.removeprefix("Value error, ")
        raise ApiError(400, message, param=param) from e
