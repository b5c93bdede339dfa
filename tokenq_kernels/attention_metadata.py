"""What the attention kernels need to know about a flattened step, as plain tensors and host values.

It lives here, beside the kernels that read it, so that kernels import nothing from the layers above them."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # The decode rows are the previous step's decode rows, in order, each one token further: a CPU layer may
    # append to its dense copy of their keys and values (tokenq_kernels.dense_decode) instead of copying again.
    decodes_continue: bool = False
    # What the reference kernels derive from the step on a CPU once and reuse in every layer (gather indices,
    # masks), rather than rebuild per layer. Never filled for CUDA tensors: a captured graph must recompute.
    ref_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
