"""Strings a client sends: valid Unicode only, so that a lone surrogate ("\\ud800", which JSON can spell
but UTF-8 cannot) is a 400 naming its field, not an encoding error deep in tokenizing or storing."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field


def encodable(value: str) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}); "
                             "strings must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]


def text_up_to(chars: int) -> Any:
    """Text of at most `chars` characters. The bound sits before `encodable`, so pydantic checks it as a
    string's and its error says "at most N characters" (`Field(max_length=N)` beside `Text` would say
    "items after validation")."""
    return Annotated[str, Field(max_length=chars), AfterValidator(encodable)]
