"""A token's text in logprobs. A byte-level vocabulary splits many characters (CJK, emoji) over tokens that
are not UTF-8 alone; decoding one gives "\ufffd", so distinct tokens showed the same text, collided as keys
of /v1/completions' top_logprobs and reported bytes [239, 191, 189]. Such a token is written as OpenAI
writes it, "bytes:\\xe4\\xbd", and its bytes are read back from that spelling."""

from __future__ import annotations

import re

BYTES_PREFIX = "bytes:"
_ESCAPED_BYTE = re.compile(r"\\x([0-9a-f]{2})")


def token_string(raw: bytes) -> str:
    """The token's text when its bytes are UTF-8, else "bytes:" and each byte as \\xNN."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in raw)


def token_bytes(token: str) -> bytes:
    """The bytes of a token's text as `token_string` wrote it."""
    if token.startswith(BYTES_PREFIX):
        escaped = token[len(BYTES_PREFIX):]
        if escaped and _ESCAPED_BYTE.sub("", escaped) == "":
            return bytes(int(h, 16) for h in _ESCAPED_BYTE.findall(escaped))
    return token.encode("utf-8")
