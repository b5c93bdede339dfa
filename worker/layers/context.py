"""Per-step attention metadata, set once by the model runner and read by every attention layer
(one small context object instead of threading it through each call, as nano-vllm does)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flattened step: sequences 0..num_decodes-1 are decodes (one query token each), then prefill chunks.

    For sequence i, its query tokens are rows query_start_loc[i]:query_start_loc[i+1] of q, and they sit at
    the last positions of a context of seq_lens[i] tokens (the cached ones plus these), so the query token j
    (0-based within the chunk) may attend keys 0..seq_lens[i]-query_len+j.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32: context length after this step
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # the first num_decodes sequences have query length 1
    # Host copies, so reference kernels can plan without a device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


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
