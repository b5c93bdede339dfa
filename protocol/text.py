"""Strings a client sends: valid Unicode only, so that a lone surrogate ("\\ud800", which JSON can spell
but UTF-8 cannot) is a 400 naming its field, not an encoding error deep in tokenizing or storing."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def encodable(value: str) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}); "
                             "strings must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]
