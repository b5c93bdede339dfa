"""Strings a client sends: valid Unicode only, so that a lone surrogate ("\\ud800", which JSON can spell
but UTF-8 cannot) is a 400 naming its field, not an encoding error deep in tokenizing or storing. A JSON
value (a schema, template variables) obeys the same rule in every string it holds, keys included."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field


def encodable(value: str, where: str = "") -> str:
    """`value` when UTF-8 can hold it; `where` names the string inside a JSON value, for the error."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate{where} (\\u{ord(value[e.start]):04x} at character "
                             f"{e.start}); strings must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]


def text_up_to(chars: int) -> Any:
    """Text of at most `chars` characters. The bound sits before `encodable`, so pydantic checks it as a
    string's and its error says "at most N characters" (`Field(max_length=N)` beside `Text` would say
    "items after validation")."""
    return Annotated[str, Field(max_length=chars), AfterValidator(encodable)]


# Nested objects and arrays in a JSON value a client sends (a content part's extra keys, template variables, a
# response_format): deeper is refused, well within the ~250 levels pydantic's encoder writes when the request
# is stored. JSON Schemas have their own, tighter bound (gateway/schema_rules.py).
MAX_JSON_DEPTH = 128


def encodable_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`value` when every string in it, keys included, is `encodable` and it nests at most `max_depth`
    levels; else the error says where (the path of keys and indices). Walked with a list, not recursion: a
    value nested as deep as the JSON parser allows costs no stack."""
    todo: list[tuple[Any, tuple | None, int]] = [(value, None, 0)]  # (item, (parent's trail, key) or None, depth)
    while todo:
        item, trail, depth = todo.pop()
        if isinstance(item, str):
            _encodable_in(item, trail, is_key=False)
        elif isinstance(item, dict | list | tuple) and depth >= max_depth:
            raise ValueError(f"nests deeper than {max_depth} levels of objects and arrays")
        elif isinstance(item, dict):
            for key, v in item.items():
                _encodable_in(key, trail, is_key=True)
                todo.append((v, (trail, key), depth + 1))
        elif isinstance(item, list | tuple):
            todo.extend((v, (trail, i), depth + 1) for i, v in enumerate(item))
    return value


def _encodable_in(text: str, trail: tuple | None, is_key: bool) -> None:
    try:
        encodable(text)
    except ValueError:  # the path is spelled out only for the error
        parts: list[str] = []
        while trail is not None:
            trail, key = trail
            parts.append(str(key))
        path = ".".join(reversed(parts))
        where = f" in a key of {path or 'the object'}" if is_key else f" in {path}" if path else ""
        encodable(text, where)  # raises again, saying where


EncodableJson = Annotated[Any, AfterValidator(encodable_json)]


def quotable(text: str) -> str:
    """`text` with any lone surrogate written as its escape (\\ud800): a message that quotes a client's
    value back always encodes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")
