"""Paged attention over block tables for a flattened step of decodes and prefill chunks.

Layout: q [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]. Query head h reads KV head
h // (Hq // Hkv), as in Hugging Face's repeat_kv. The cache must hold finite values everywhere (allocate it
with zeros): padded positions are masked out of the softmax, but 0 * NaN would still poison the sum.
An FP8 cache is read back times its scales (k_scale, v_scale: one-element float32 tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from tokenq_kernels.dispatch import HAS_TRITON, use_triton
from tokenq_kernels.fp8 import FP8
from tokenq_kernels.kv_cache import from_cache

if HAS_TRITON:
    from tokenq_kernels.attention_triton import paged_attention_triton

if TYPE_CHECKING:
    from tokenq_kernels.attention_metadata import AttentionMetadata
    from tokenq_kernels.dense_decode import DenseDecodeKV


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache[block_tables] as [S, n_blocks * block_size, Hkv, D]; index_select measures ~2x faster than indexing."""
    S, n = block_tables.shape
    return _gather_flat(cache, block_tables.reshape(-1), S)


def _gather_flat(cache: torch.Tensor, blocks: torch.Tensor, S: int) -> torch.Tensor:
    """cache[blocks] as [S, len(blocks) // S * block_size, Hkv, D] (blocks: S rows of block ids, flattened)."""
    _, bs, h, d = cache.shape
    if cache.dtype == FP8:  # torch's CPU index_select has no float8 kernel; the bytes are the same
        return cache.view(torch.uint8).index_select(0, blocks).view(FP8).view(S, -1, h, d)
    return cache.index_select(0, blocks).view(S, -1, h, d)


class _DecodePlan(NamedTuple):
    """Decodes padded to a common length: the flattened block ids to gather and the mask of real keys."""

    blocks: torch.Tensor  # [S * n_blocks]
    mask: torch.Tensor  # [S, 1, 1, n_blocks * block_size] bool


def _decode_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, block_size: int) -> _DecodePlan:
    n_blocks = -(-max_len // block_size)
    mask = torch.arange(n_blocks * block_size, device=seq_lens.device) < seq_lens[:, None]
    return _DecodePlan(block_tables[:, :n_blocks].reshape(-1), mask[:, None, None, :])


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: _DecodePlan,
    scale: float,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """Decodes padded to a common length: q [S, Hq, D] -> [S, Hq, D]."""
    S, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = from_cache(_gather_flat(k_cache, plan.blocks, S), q.dtype, kv_scales[0]).transpose(1, 2)  # [S, Hkv, L, D]
    v = from_cache(_gather_flat(v_cache, plan.blocks, S), q.dtype, kv_scales[1]).transpose(1, 2)
    # The GQA group rides in the query dimension, so K/V are read once per KV head, never repeated.
    out = F.scaled_dot_product_attention(q.reshape(S, hkv, hq // hkv, d), k, v, attn_mask=plan.mask, scale=scale)
    return out.reshape(S, hq, d)


# Decodes of very different lengths run in a few groups of similar length, so that short contexts are not
# padded to the longest one; below this many decodes per group the extra calls cost more than they save.
_MIN_DECODE_GROUP = 16
_MAX_DECODE_GROUPS = 4


def _decode_plans(meta: AttentionMetadata, S: int, block_size: int) -> list[tuple[torch.Tensor | None, _DecodePlan]]:
    """The step's decode groups: (rows, or None for all S rows in order; their plan)."""
    lens = meta.seq_lens_cpu[:S]
    n_groups = min(_MAX_DECODE_GROUPS, S // _MIN_DECODE_GROUP)
    if n_groups <= 1 or min(lens) * 2 > max(lens):
        return [(None, _decode_plan(meta.block_tables[:S], meta.seq_lens[:S], max(lens), block_size))]
    order = sorted(range(S), key=lens.__getitem__)
    plans = []
    for g in range(n_groups):
        rows = order[g * S // n_groups : (g + 1) * S // n_groups]
        idx = torch.tensor(rows, device=meta.seq_lens.device)
        plans.append((idx, _decode_plan(meta.block_tables.index_select(0, idx), meta.seq_lens.index_select(0, idx),
                                        lens[rows[-1]], block_size)))
    return plans


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None, dense: DenseDecodeKV | None = None,
) -> torch.Tensor:
    """All decodes of the step: q [S, Hq, D] -> [S, Hq, D]. With `dense` and the decodes' new keys and values
    (new_kv, [S, Hkv, D] each) on a CPU, over the layer's dense copy where it applies."""
    S = q.shape[0]
    if dense is not None and new_kv is not None and q.device.type == "cpu":
        out = dense.attend(q, *new_kv, k_cache, v_cache, meta, scale)
        if out is not None:
            return out
    if q.device.type == "cpu":  # the same plan for every layer of the step
        key = ("decode", S, k_cache.shape[1])
        plans = meta.ref_cache.get(key)
        if plans is None:
            plans = meta.ref_cache[key] = _decode_plans(meta, S, k_cache.shape[1])
    else:
        plans = _decode_plans(meta, S, k_cache.shape[1])
    if len(plans) == 1:
        return _decode_group(q, k_cache, v_cache, plans[0][1], scale, kv_scales)
    out = torch.empty_like(q)
    for idx, plan in plans:
        assert idx is not None
        out.index_copy_(0, idx, _decode_group(q.index_select(0, idx), k_cache, v_cache, plan, scale, kv_scales))
    return out


def _prefill_one(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """One prefill chunk: q [Lq, Hq, D] at the last Lq positions of a seq_len context -> [Lq, Hq, D]."""
    lq = q.shape[0]
    if k_new is not None and v_new is not None and lq == seq_len:
        k, v, mask, causal = k_new, v_new, None, True  # the chunk is the whole context: no gather
    else:
        bs = k_cache.shape[1]
        bt = block_table[None, : -(-seq_len // bs)]
        k = from_cache(_gather(k_cache, bt)[0, :seq_len], q.dtype, kv_scales[0])
        v = from_cache(_gather(v_cache, bt)[0, :seq_len], q.dtype, kv_scales[1])
        # Query j sits at position seq_len - lq + j and sees keys 0..that position.
        rows = torch.arange(seq_len - lq, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= rows[:, None]
        causal = False
    # 4-D inputs take torch's CPU flash kernel, which handles GQA without repeating K/V (~3x faster than 3-D).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dense: DenseDecodeKV | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]. The step's own keys/values must already be in the cache.

    k, v [T, Hkv, D] (optional): the step's new keys/values, which let a prefill chunk that is its whole
    context attend to them directly instead of gathering them back from the cache, and the decodes append
    to the layer's dense copy (`dense`) instead of gathering (a 16-bit cache only: with an FP8 cache every
    read sees the cached values, as the Triton kernel does).
    """
    kv_scales = (k_scale, v_scale)
    if k_cache.dtype == FP8:
        k = v = None
    nd = meta.num_decodes
    new_kv = None if k is None or v is None else (k[:nd], v[:nd])
    if nd == meta.num_seqs:
        return _decode(q, k_cache, v_cache, meta, scale, kv_scales, new_kv, dense)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta, scale, kv_scales, new_kv, dense)
    loc = meta.query_start_loc_cpu
    for i in range(nd, meta.num_seqs):
        a, b = loc[i], loc[i + 1]
        out[a:b] = _prefill_one(
            q[a:b],
            k_cache,
            v_cache,
            meta.block_tables[i],
            meta.seq_lens_cpu[i],
            scale,
            None if k is None else k[a:b],
            None if v is None else v[a:b],
            kv_scales,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dense: DenseDecodeKV | None = None,
) -> torch.Tensor:
    """Triton on CUDA (reads everything from the cache, so k, v and dense are not needed), else the reference."""
    if use_triton(q):
        return paged_attention_triton(q, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, k, v, k_scale, v_scale, dense)
