"""Guided requests for the throughput benchmark: a realistic extraction schema and a synthetic vocabulary
of the model's size, so a random-weight model (which has no tokenizer) is constrained as a real one is.

The vocabulary: the 256 single bytes (every string stays reachable), an end-of-text token last (where the
grammar may end), and the rest random pieces of 2 to 8 characters: words of letters, digits and spaces,
and 3% with punctuation, so that about 0.3% of the tokens hold a quote, as in real BPE vocabularies
(SmolLM2's: 163 of 49,152). Tokens with quotes, braces and backslashes are those a grammar checks one by
one, so their share, more than the vocabulary's size, sets the cost of a mask.
"""

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

_WORDS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + b" " * 8, dtype=np.uint8)
_PUNCTUATED = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .,:;-_()'\"{}[]\\", dtype=np.uint8)
PUNCTUATED_SHARE = 0.03


def _pieces(rng: np.random.Generator, n: int, alphabet: np.ndarray) -> list[bytes]:
    lengths = rng.integers(2, 9, n)
    chars = alphabet[rng.integers(0, len(alphabet), int(lengths.sum()))].tobytes()
    ends = np.cumsum(lengths)
    return [chars[e - k : e] for e, k in zip(ends.tolist(), lengths.tolist(), strict=True)]


def synthetic_vocabulary(vocab_size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    n = vocab_size - 257
    punctuated = int(n * PUNCTUATED_SHARE)
    pieces = _pieces(rng, n - punctuated, _WORDS) + _pieces(rng, punctuated, _PUNCTUATED)
    order = rng.permutation(n).tolist()
    return [bytes([b]) for b in range(256)] + [pieces[i] for i in order] + [b"</s>"]


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
