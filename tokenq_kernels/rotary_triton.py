"""Triton rotary embedding, in place on q and k: one program per token rotates all its q and k heads.

Consumes the layer's cos/sin cache as built (any scaling, e.g. Llama 3, is already in it); neox layout,
the first half of each head rotated against the second as Hugging Face's rotate_half.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs


@triton.jit
def rotate_heads(base, stride_h, cos, sin, NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's heads rotated in place; returns the rotated halves [BLOCK_H, BLOCK_HALF] as stored (the
    fused rotary + KV store, tokenq_kernels/rotary_kv_triton.py, writes them to the cache too)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HALF)
    p1 = base + heads * stride_h + cols
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    r1 = (a * cos - b * sin).to(x1.dtype)
    r2 = (b * cos + a * sin).to(x2.dtype)
    tl.store(p1, r1, mask=mask)
    tl.store(p1 + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    row = cache_ptr + pos * stride_cache + cols
    cos = tl.load(row, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_QH, HALF, BLOCK_HALF)
    rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, BLOCK_KH, HALF, BLOCK_HALF)


def rotary_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq*D] and k [T, Hkv*D] in place (strided views of the qkv output are fine); returns them."""
    T = positions.shape[0]
    if T == 0:
        return q, k
    qv, kv = q.view(T, -1, head_dim), k.view(T, -1, head_dim)
    if qv.stride(2) != 1 or kv.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError("rotary needs the head dimension contiguous")
    half = head_dim // 2
    pdl = pdl_options(q)
    _rotary_kernel[(T,)](
        positions, qv, kv, cos_sin_cache,
        qv.stride(0), qv.stride(1), kv.stride(0), kv.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=qv.shape[1], NUM_K_HEADS=kv.shape[1],
        BLOCK_QH=next_pow2(qv.shape[1]), BLOCK_KH=next_pow2(kv.shape[1]),
        HALF=half, BLOCK_HALF=next_pow2(half),
        num_warps=4, **pdl,
    )
    return q, k
