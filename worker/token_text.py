"""id -> a token's text for logprobs. `decode([id])` gives "\ufffd" for a token that holds part of a
character's bytes; the token's own bytes come from its vocabulary piece instead: "<0xE4>" in a
SentencePiece vocabulary with byte fallback, or GPT-2's byte-to-character alphabet in a byte-level BPE one
(Llama 3, SmolLM2, Qwen)."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from protocol.token_bytes import token_string
from protocol.workers import ModelCard

TokenText = Callable[[int], str]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
REPLACEMENT = "\ufffd"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


def piece_bytes(piece: str | None) -> bytes | None:
    """A vocabulary piece's bytes, where the piece spells them (a byte token or a byte-level piece)."""
    if not piece:
        return None
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    if all(c in _BYTE_OF_CHAR for c in piece):
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return None


def token_text_from(engine: object, card: ModelCard) -> TokenText | None:
    """id -> token text for logprobs, from the engine's tokenizer or else the card's tokenizer JSON;
    None if neither can be had (token strings are then "")."""
    tok = getattr(engine, "tokenizer", None)
    if not callable(getattr(tok, "decode", None)):
        if not card.tokenizer_json:
            return None
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(card.tokenizer_json)
        except Exception:
            return None
    id_to_token = getattr(tok, "id_to_token", None)

    @lru_cache(maxsize=1 << 16)
    def text(token_id: int) -> str:
        decoded = tok.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT not in decoded or id_to_token is None:
            return decoded
        raw = piece_bytes(id_to_token(token_id))
        return decoded if raw is None else token_string(raw)

    return text
