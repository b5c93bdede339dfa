"""Guided requests for the throughput benchmark: a realistic extraction schema and a synthetic vocabulary
of the model's size, so a random-weight model (which has no tokenizer) is constrained as a real one is.

The vocabulary: the 256 single bytes (every string stays reachable), an end-of-text token last (where the
grammar may end), and the rest random pieces of text of 2 to 8 characters, quotes and braces included at
the rate of ordinary JSON-ish text."""

from __future__ import annotations

import numpy as np

EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "company": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "amount": {"type": "number"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "parties": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "role": {"enum": ["buyer", "seller", "agent"]}},
            "required": ["name", "role"], "additionalProperties": False}},
        "summary": {"type": "string"},
    },
    "required": ["company", "date", "amount", "currency", "parties", "summary"],
    "additionalProperties": False,
}

_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + b"    " * 4
                          + b'.,:;-_"{}[]', dtype=np.uint8)


def synthetic_vocabulary(vocab_size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    n = vocab_size - 257
    lengths = rng.integers(2, 9, n)
    chars = _ALPHABET[rng.integers(0, len(_ALPHABET), int(lengths.sum()))].tobytes()
    ends = np.cumsum(lengths)
    pieces = [chars[e - k : e] for e, k in zip(ends.tolist(), lengths.tolist(), strict=True)]
    return [bytes([b]) for b in range(256)] + pieces + [b"</s>"]


def synthetic_guided_decoding(vocab_size: int, seed: int = 0):
    """A GuidedDecoding over the synthetic vocabulary; its stop token is the last id."""
    import xgrammar as xgr

    from worker.engine.guided import GuidedDecoding

    def info() -> xgr.TokenizerInfo:
        return xgr.TokenizerInfo(synthetic_vocabulary(vocab_size, seed), xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=[vocab_size - 1])

    return GuidedDecoding(info, vocab_size)


def constrained_rows(n: int, fraction: float) -> list[bool]:
    """Which of n requests are constrained: evenly spread, round(n * fraction) of them."""
    return [int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9) for i in range(n)]
