"""From a request's sampling fields to protocol SamplingParams, with errors that name the client's field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gateway.errors import ApiError, describe_validation_error, most_telling
from gateway.schemas import CompletionRequest, SamplingFields
from protocol.errors import CONTEXT_LENGTH_EXCEEDED, no_room_message
from protocol.guided import GuidedSpec
from protocol.sampling import MAX_LOGPROBS, SamplingParams

MAX_DEFAULT_TOKENS = 4096  # max_tokens when the client gives none: the rest of the context, up to this
COMPLETIONS_DEFAULT_TOKENS = 16  # /v1/completions' default instead, as OpenAI's legacy route and vLLM's

_SAME_NAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
              "min_tokens", "ignore_eos", "stop_token_ids", "repetition_penalty", "stop", "n", "best_of",
              "logit_bias", "include_stop_str_in_output")



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


def default_max_tokens(req: SamplingFields) -> int:
    """max_tokens when the request gives none (the context's room may cap it further)."""
    return COMPLETIONS_DEFAULT_TOKENS if isinstance(req, CompletionRequest) else MAX_DEFAULT_TOKENS


def _token_id(key: str) -> int | None:
    """A logit_bias key as the token id it is read as ("+5" and " 5" too), None when it is not one."""
    try:
        return int(key)
    except ValueError:
        return None


def check_vocabulary(req: SamplingFields, vocab_size: int) -> None:
    """Token ids and top_k within the model's vocabulary: past it they index outside the logits."""
    bad = next((t for t in req.stop_token_ids or () if t >= vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: token id {bad} is outside the vocabulary (ids are 0 to "
                            f"{vocab_size - 1})", param="stop_token_ids")
    bad_key = next((k for k in req.logit_bias or () if (_token_id(k) or 0) >= vocab_size), None)
    if bad_key is not None:
        raise ApiError(400, f"logit_bias: token id {bad_key} is outside the vocabulary (ids are 0 to "
                            f"{vocab_size - 1})", param=f"logit_bias.{bad_key}")
    if req.top_k is not None and req.top_k > vocab_size:
        raise ApiError(400, f"top_k: must be at most the vocabulary size {vocab_size} (got {req.top_k})",
                       param="top_k")


def to_sampling(req: SamplingFields, prompt_tokens: int, max_model_len: int, prompt_field: str,
                vocab_size: int | None = None, prompt_logprobs: int | None = None,
                guided: GuidedSpec | None = None) -> SamplingParams:
    """Validated SamplingParams; max_tokens checked against (or defaulted to) what the context leaves,
    token ids and top_k against the vocabulary when its size is given. `guided` comes checked from
    gateway/guided.py."""
    room = max_model_len - prompt_tokens
    asked, max_field = requested_max_tokens(req)
    if room <= 0:
        raise ApiError(400, no_room_message(max_model_len, prompt_tokens), param=prompt_field,
                       code=CONTEXT_LENGTH_EXCEEDED)
    if asked is not None and asked >= 1 and prompt_tokens + asked > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} "
                            f"for {max_field}); lower {max_field} or shorten the prompt", param=max_field,
                       code=CONTEXT_LENGTH_EXCEEDED)
    if asked == 0 and prompt_logprobs is None:
        raise ApiError(400, f"{max_field}: 0 is allowed only on /v1/completions with echo and logprobs "
                            "(to score the prompt)", param=max_field)
    if vocab_size is not None:
        check_vocabulary(req, vocab_size)
    top = getattr(req, "top_logprobs", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:  # within bounds even where logprobs is off
        raise ApiError(400, f"top_logprobs: 0 to {MAX_LOGPROBS} (got {top})", param="top_logprobs")
    values: dict[str, Any] = {
        "max_tokens": asked if asked is not None else min(room, default_max_tokens(req)),
        "logprobs": requested_logprobs(req),
        "prompt_logprobs": prompt_logprobs,
        "guided": guided,
    }
    for name in _SAME_NAME:
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    try:
        sampling = SamplingParams.model_validate(values)
    except ValidationError as e:
        err = most_telling(e.errors())
        message, param = describe_validation_error(err)
        if param == "max_tokens":
            message, param = message.replace("max_tokens", max_field, 1), max_field
        if param == "logprobs" and getattr(req, "top_logprobs", None) is not None:
            message, param = message.replace("logprobs", "top_logprobs", 1), "top_logprobs"
        if param is None:  # a cross-field rule; its message names the fields
            message = message.removeprefix("Value error, ")
        raise ApiError(400, message, param=param) from e
    return sampling


def check_streaming(sampling: SamplingParams, stream: bool) -> None:
    """best_of > n picks its choices at the end: nothing can be streamed before (OpenAI's 400 too)."""
    if stream and sampling.best_of is not None and sampling.best_of > sampling.n:
        raise ApiError(400, f"best_of: streaming is not supported when best_of ({sampling.best_of}) is greater "
                            f"than n ({sampling.n}): the best choices are known only at the end", param="best_of")
