"""Batch input lines: splitting a stream in any chunking, checking a line, the feed order and dedup keys."""

from __future__ import annotations

import json

import pytest

from batches.lines import LineError, LineSplitter, line_text, parse_line
from batches.store import window_seconds
from gateway.errors import ApiError


def _line(custom_id: str = "a", **body) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_splitter_gives_the_same_lines_in_any_chunking(size):
    data = b"one\r\ntwo\n\n  \nthree"
    splitter = LineSplitter(max_line_bytes=100)
    got = [x for i in range(0, len(data), size) for x in splitter.feed(data[i:i + size])]
    got += list(splitter.close())
    assert got == [(1, b"one"), (2, b"two"), (5, b"three")]


def test_splitter_refuses_a_long_line_before_holding_it():
    splitter = LineSplitter(max_line_bytes=10)
    assert list(splitter.feed(b"short\n")) == [(1, b"short")]
    with pytest.raises(LineError, match="line 2: longer than the limit of 10 bytes"):
        list(splitter.feed(b"x" * 11))


def test_parse_line_checks_the_body_as_the_route_does():
    assert parse_line(_line("x"), 1).custom_id == "x"
    with pytest.raises(LineError, match=r"line 4: body\.temperature"):
        parse_line(_line(temperature="hot"), 4)
    with pytest.raises(LineError, match="line 2: custom_id"):
        parse_line(_line(""), 2)
    with pytest.raises(LineError, match="line 9: must be a JSON object"):
        parse_line("[1, 2]", 9)


@pytest.mark.parametrize(("body", "words"), [
    ({"max_tokens": -1}, "body.max_tokens"),
    ({"temperature": 5}, "body.temperature"),
    ({"n": 500}, "body.n"),
    ({"top_p": 2}, "body.top_p"),
    ({"stop": [str(i) for i in range(10)]}, "body.stop"),
    ({"logprobs": True, "top_logprobs": 50}, "body.top_logprobs: 0 to 20"),
    ({"top_logprobs": 3}, "body.top_logprobs: top_logprobs needs `logprobs: true`"),
    ({"response_format": {"type": "json_schema"}}, "body.response_format"),
    ({"tool_choice": "required"}, "body.tool_choice: requires `tools`"),
])
def test_a_line_obeys_the_routes_rules_that_hold_whatever_the_model(body, words):
    """The route refuses these before it asks a model: so does the upload, rather than failing the line
    when it is fed."""
    with pytest.raises(LineError, match=f"line 3: {words}"):
        parse_line(_line(**body), 3)


def test_a_line_nested_past_the_parser_is_a_bad_line():
    """json.loads raises RecursionError there, not JSONDecodeError: it was a 500."""
    with pytest.raises(LineError, match="line 1: not valid JSON: it nests deeper than the JSON parser goes"):
        parse_line("[" * 100_000 + "]" * 100_000, 1)


@pytest.mark.parametrize(("line", "words"), [
    (_line("\ud800"), "custom_id: .*unicode"),  # written into the output file (pydantic refuses it)
    (_line(temperature=0, extra={"k": ["\ud800"]}), r"body: contains a lone surrogate in extra\.k\.0"),  # hashed
])
def test_a_lone_surrogate_the_route_would_not_see_is_a_bad_line(line, words):
    with pytest.raises(LineError, match=f"line 1: {words}"):
        parse_line(line, 1)


def test_a_prompt_too_long_for_some_model_waits_for_the_model():
    assert parse_line(_line(max_tokens=500_000), 1).custom_id == "a"  # more than any context here


@pytest.mark.parametrize(("line", "words"), [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}', "body: Field required"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": "s"}', "body: Input should be"),
])
def test_an_envelope_error_names_the_lines_body(line, words):
    with pytest.raises(LineError, match=f"line 1: {words}"):
        parse_line(line, 1)


def test_line_text_takes_utf8_without_its_byte_order_mark_and_refuses_other_encodings():
    line = _line("é").replace("\\u00e9", "é")
    assert "é" in line
    assert line_text(("\ufeff" + line).encode(), 1) == line
    assert parse_line(line_text(("\ufeff" + line).encode(), 1), 1).custom_id == "é"
    with pytest.raises(LineError, match="line 2: not UTF-8 text .*0xff"):
        line_text(line.encode("utf-16"), 2)  # json.loads would take UTF-16 bytes; the stored line could not be read
    with pytest.raises(LineError, match="line 4: not UTF-8 text .*0xe9"):
        line_text(line.encode("latin-1"), 4)


def test_a_stored_line_that_kept_its_byte_order_mark_parses():
    """A file stored with the mark on its first line (uploaded before the upload dropped it) is read back by
    parse_line: the mark is no part of the line there either."""
    assert parse_line("\ufeff" + _line("first"), 1).custom_id == "first"


def test_only_deterministic_identical_lines_share_a_digest():
    greedy = parse_line(_line("a", temperature=0), 1).dedup_digest()
    assert greedy is not None
    assert parse_line(_line("b", temperature=0), 2).dedup_digest() == greedy  # custom_id is not part of it
    assert parse_line(_line("c", temperature=0, max_tokens=5), 3).dedup_digest() != greedy
    assert parse_line(_line("d", seed=7), 4).dedup_digest() is not None
    assert parse_line(_line("e"), 5).dedup_digest() is None
    assert parse_line(_line("f", temperature=0.8), 6).dedup_digest() is None


def test_prompt_key_orders_shared_prefixes_together():
    lines = [parse_line(_line(str(i), messages=[{"role": "user", "content": c}]), i + 1)
             for i, c in enumerate(["b tail", "a one", "b head", "a two"])]
    order = [line.custom_id for line in sorted(lines, key=lambda x: x.prompt_key())]
    assert order == ["1", "3", "2", "0"]


def test_completion_window():
    assert window_seconds("24h") == 86400 and window_seconds("90s") == 90 and window_seconds("30m") == 1800
    for bad in ("25h", "0s", "1w", "", "h"):
        with pytest.raises(ApiError, match="completion_window"):
            window_seconds(bad)
