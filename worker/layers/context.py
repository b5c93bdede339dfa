"""The step's attention metadata (tokenq_kernels.attention_metadata), set once by the model runner and read by every
attention layer (one small context object instead of threading it through each call, as nano-vllm does)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tokenq_kernels.attention_metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "get_attention_metadata", "set_attention_metadata"]

_current: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("no attention metadata set: call the model inside set_attention_metadata()")
    return _current


@contextmanager
def set_attention_metadata(meta: AttentionMetadata) -> Iterator[None]:
    global _current
    prev, _current = _current, meta
    try:
        yield
    finally:
        _current = prev
