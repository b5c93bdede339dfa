"""Decode attention on the CPU over a dense copy of the decoding sequences' keys and values.

The paged cache scatters each sequence over blocks, so the reference decode gathers every block of every
decoding sequence in every layer at every step, and torch's CPU attention then reads the gathered keys
token-major. While the same sequences decode step after step (the runner says so: meta.decodes_continue),
one layer's DenseDecodeKV keeps their keys and values head-major ([S, Hkv, L, D], the layout torch's CPU
flash kernel reads fastest), appends each step's one new token per sequence, and copies from the paged cache
only when the decoding rows change. The paged cache stays the source of truth; this is a copy of the
decoding sequences' part of it, used only while it is no larger than a quarter of the layer's paged cache.
That quarter is taken, zeroed, when the layer binds its cache: a buffer first touched mid-run costs the kernel
a fault per page (about a second of system time in a CPU engine's first burst of 32 chat requests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenq_kernels.attention_metadata import AttentionMetadata

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the caches a CPU decode attends with the query's dtype


class DenseDecodeKV:
    """One attention layer's dense copy of its decoding sequences' keys and values (CPU only)."""

    def __init__(self) -> None:
        # The memory the copy lives in: [2, a quarter of the paged cache's elements], keys then values (reserve).
        self._store: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # [S_cap, Hkv, L_cap, D], a view of _store[0]
        self.v: torch.Tensor | None = None
        self.lens: list[int] = []  # each row's context length as of the last step this copy attended

    def reserve(self, k_cache: torch.Tensor) -> None:
        """Takes the copy's memory for this paged cache ([num_blocks, block_size, Hkv, D]) now, zeroed: none
        for a cache the copy never serves (on a GPU, or FP8)."""
        self.reset()
        serves = k_cache.device.type == "cpu" and k_cache.dtype in _DTYPES and k_cache.numel() >= 4
        self._store = torch.zeros(2, k_cache.numel() // 4, dtype=k_cache.dtype) if serves else None

    def reset(self) -> None:
        """Forgets the copy (the next decode copies from the paged cache again); its memory stays reserved."""
        self.k = self.v = None
        self.lens = []

    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor | None:
        """The step's decodes, q [S, Hq, D] -> [S, Hq, D], with k_new and v_new [S, Hkv, D] their new keys and
        values (already in the paged cache); None where the copy does not apply (the caller gathers instead)."""
        store = self._store
        if store is None or k_cache.dtype != q.dtype:  # a cache the copy does not serve (it never made one)
            return None
        S, hq, d = q.shape
        _, bs, hkv, _ = k_cache.shape
        lens = _lens(meta, S)
        L = max(lens)
        span = -(-L // bs) * bs  # the columns a copy from the paged cache writes
        fits = self.k is not None and self.k.shape[0] >= S and self.k.shape[2] >= span
        # A new view gives its S rows every token the store holds: a run of steps appends into it.
        room = self.k.shape[2] if fits else store.shape[1] // (S * hkv * d)
        # Not past the store (a quarter of the paged cache), nor where padding to the longest row would more than
        # double the work.
        if room < span or 2 * sum(lens) < S * L:
            self.reset()
            return None
        if not fits:  # views of the zeroed store: masked positions meet only finite values (0 * NaN poisons)
            self.k, self.v = store[:, : S * hkv * room * d].view(2, S, hkv, room, d).unbind(0)
        continuing = (meta.decodes_continue and fits and len(self.lens) == S
                      and all(a + 1 == b for a, b in zip(self.lens, lens, strict=True)))
        if continuing:
            at = _append_index(meta, S, hkv, self.k.shape[2])
            self.k.view(-1, d).index_copy_(0, at, k_new.reshape(S * hkv, d))
            self.v.view(-1, d).index_copy_(0, at, v_new.reshape(S * hkv, d))
        else:
            self._copy_from_cache(k_cache, v_cache, meta.block_tables[:S], S, L, bs)
        self.lens = list(lens)
        k, v = self.k[:S, :, :L], self.v[:S, :, :L]
        # The GQA group rides in the query dimension, so K/V are read once per KV head, never repeated.
        mask = None if min(lens) == L else _mask(meta, S, L)
        out = F.scaled_dot_product_attention(q.reshape(S, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(S, hq, d)

    def _copy_from_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, S: int,
                         L: int, bs: int) -> None:
        assert self.k is not None and self.v is not None
        _, _, hkv, d = k_cache.shape
        n_blocks = -(-L // bs)
        blocks = block_tables[:, :n_blocks].reshape(-1)
        for dense, cache in ((self.k, k_cache), (self.v, v_cache)):
            gathered = cache.index_select(0, blocks).view(S, n_blocks * bs, hkv, d)
            dense[:S, :, : n_blocks * bs].copy_(gathered.transpose(1, 2))


def _lens(meta: AttentionMetadata, S: int) -> list[int]:
    """The decodes' context lengths, read once per step from the seq_lens tensor: a padded batch's host copy
    (seq_lens_cpu) holds only an upper bound."""
    key = ("dense_lens", S)
    lens = meta.ref_cache.get(key)
    if lens is None:
        lens = meta.ref_cache[key] = meta.seq_lens[:S].tolist()
    return lens


def _append_index(meta: AttentionMetadata, S: int, hkv: int, cap: int) -> torch.Tensor:
    """[S * hkv]: the rows of a [S_cap * hkv * cap, D] view of a dense copy where the step's new decode keys
    (row by row, head by head) go; made once per step and shared by every layer."""
    key = ("dense_append", S, hkv, cap)
    index = meta.ref_cache.get(key)
    if index is None:
        row_heads = torch.arange(S * hkv).view(S, hkv) * cap
        index = meta.ref_cache[key] = (row_heads + (meta.seq_lens[:S].long() - 1)[:, None]).reshape(-1)
    return index


def _mask(meta: AttentionMetadata, S: int, L: int) -> torch.Tensor:
    """[S, 1, 1, L]: True where a row's key is part of its context."""
    key = ("dense_mask", S, L)
    mask = meta.ref_cache.get(key)
    if mask is None:
        mask = meta.ref_cache[key] = (torch.arange(L) < meta.seq_lens[:S, None])[:, None, None, :]
    return mask
