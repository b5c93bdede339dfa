"""OpenAI's error JSON, used by every non-2xx answer of the gateway."""

from __future__ import annotations

from pydantic import BaseModel

from protocol.text import quotable

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code, which clients look for to trim a prompt


def no_room_message(max_model_len: int, prompt_tokens: int) -> str:
    """The message of a prompt that leaves no room to generate (the gateway's check and a worker's)."""
    return (f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_tokens} tokens: no room is left to generate")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_json(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The error object. Message and param may quote the client's input: a lone surrogate there is escaped
    (`quotable`), so that the error itself always encodes."""
    param = quotable(param) if param is not None else None
    return ErrorResponse(error=ErrorBody(message=quotable(message), type=type_, param=param, code=code)).model_dump()
