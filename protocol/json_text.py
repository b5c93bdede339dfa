"""JSON text from outside (a batch line, a schema or a call's arguments sent as a string): text that is not
JSON is a ValueError, nested deeper than the parser goes included. json.loads raises RecursionError for that
one, which an `except ValueError` misses and which would then be a 500."""

from __future__ import annotations

import json
from typing import Any

TOO_DEEP = "it nests deeper than the JSON parser goes (about 1,000 levels)"


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
