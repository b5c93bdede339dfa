"""A token that holds part of a character's bytes: its logprob text is its own ("bytes:\\xe4\\xbd", as
OpenAI writes it), its `bytes` are the real ones, and /v1/completions' text_offset stays on characters."""

from __future__ import annotations

import pytest

from gateway.responses import CompletionLogprobs, chat_logprobs
from protocol.jobs import TokenLogprob
from protocol.token_bytes import token_bytes, token_string
from protocol.workers import ModelCard
from worker.token_text import piece_bytes, token_text_from

TEXT = "你好，世界 🙂 café"


@pytest.fixture(scope="module")
def token_text(default_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))

    class Engine:
        tokenizer = tok

    text = token_text_from(Engine(), ModelCard(name="m", max_model_len=8, tokenizer_json=""))
    return tok, text


def test_spelling_round_trips():
    for raw in [b"\xe4\xbd", b"\x00\xff", "é".encode(), b"bytes:"]:
        assert token_bytes(token_string(raw)) == raw
    assert token_string(b"\xe4\xbd") == "bytes:\\xe4\\xbd"
    assert token_string("café".encode()) == "café"


def test_byte_pieces_of_both_vocabulary_kinds():
    assert piece_bytes("<0xE4>") == b"\xe4"  # SentencePiece's byte fallback
    assert piece_bytes("Ã¤") == "ä".encode()  # GPT-2's byte-level alphabet
    assert piece_bytes("▁hello") is None and piece_bytes(None) is None


def test_split_characters_get_their_own_bytes(token_text):
    tok, text = token_text
    ids = tok.encode(TEXT).ids
    tokens = [text(i) for i in ids]
    split = [t for t in tokens if t.startswith("bytes:")]
    assert len(split) >= 4 and len(set(split)) >= 3  # different bytes, different texts (they were all "\ufffd")
    assert b"".join(token_bytes(t) for t in tokens).decode() == TEXT
    assert all("\ufffd" not in t for t in tokens)


def test_chat_bytes_and_completion_offsets_follow_the_characters(token_text):
    tok, text = token_text
    ids = tok.encode(TEXT).ids
    entries = [TokenLogprob(token_id=i, token=text(i), logprob=-1.0) for i in ids]
    content = chat_logprobs(entries)["content"]
    assert bytes(b for c in content for b in c["bytes"]) == TEXT.encode()
    # Streamed in two pieces, echo of a 3-character prompt before them.
    logprobs = CompletionLogprobs(echo_chars=3)
    offsets = logprobs.format(entries[:3])["text_offset"] + logprobs.format(entries[3:])["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 3
    def chars_before(i: int) -> int:  # a token starts after the characters whole before it
        return len(b"".join(token_bytes(e.token) for e in entries[:i]).decode("utf-8", "ignore"))

    starts = [3 + chars_before(i) for i in range(len(entries))]
    assert offsets == starts
    assert offsets[-1] == 3 + len(TEXT) - len(" café")
