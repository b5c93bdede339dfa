"""Numbers a client sends. JSON's true and false are not numbers, but pydantic's lax mode reads them as 1
and 0, so `"max_tokens": true` asked for one token and `"temperature": false` for greedy decoding. These
types refuse them, naming the field. OpenAI's and vLLM's fields (Int, Float) keep taking strings of digits,
as vLLM takes them; tokenq's own fields (Number: `ttl`, `deadline`'s epoch seconds) take JSON numbers only,
as `deadline` always read a string as a time."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator


def not_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {str(value).lower()})")
    return value


def json_number(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f"must be a JSON number, not a string (got {value[:64]!r})")
    return not_boolean(value)


Int = Annotated[int, BeforeValidator(not_boolean)]
Float = Annotated[float, BeforeValidator(not_boolean)]
Number = Annotated[float, BeforeValidator(json_number)]
