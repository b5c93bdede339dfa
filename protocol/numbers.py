"""Numbers a client sends. JSON's true and false are not numbers, but pydantic's lax mode reads them as 1
and 0, so `"max_tokens": true` asked for one token and `"temperature": false` for greedy decoding. These
types refuse them, naming the field; strings of digits stay accepted, as vLLM accepts them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator


def not_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {str(value).lower()})")
    return value


Int = Annotated[int, BeforeValidator(not_boolean)]
Float = Annotated[float, BeforeValidator(not_boolean)]
