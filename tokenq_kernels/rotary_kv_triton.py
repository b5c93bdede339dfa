"""Triton rotary embedding plus KV-cache store: one program per token (see tokenq_kernels/rotary_kv.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2
from tokenq_kernels.fp8 import FP8, FP8_MAX
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs
from tokenq_kernels.rotary_triton import rotate_heads

_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _to_cache(x, scale_ptr, QUANT: tl.constexpr):
    if QUANT:
        x = tl.clamp(tl.div_rn(x.to(tl.float32), tl.load(scale_ptr)), -_MAX, _MAX)
    return x


@triton.jit
def _rotary_store_kv_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, CACHE_BLOCK: tl.constexpr, QUANT: tl.constexpr,
    PDL: tl.constexpr,
):
    release_dependents(PDL)
    # Positions, slots and the cos/sin table come from the host or from no kernel: loaded before the wait.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    row = cache_ptr + pos * stride_cache + cols
    cos = tl.load(row, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF, mask=cols < HALF, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_QH, HALF, BLOCK_HALF)
    r1, r2 = rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, BLOCK_KH, HALF, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_KH)[:, None]  # r1 and r2's rows, as rotate_heads laid them out
    mask = (heads < NUM_KV_HEADS) & (cols < HALF)
    if slot >= 0:  # padding rows of a CUDA-graph batch have none
        block = slot // CACHE_BLOCK
        offset = slot % CACHE_BLOCK
        kc = k_cache_ptr + block * stride_kcb + offset * stride_kct + heads * stride_kch + cols
        tl.store(kc, _to_cache(r1, k_scale_ptr, QUANT).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + HALF, _to_cache(r2, k_scale_ptr, QUANT).to(k_cache_ptr.dtype.element_ty), mask=mask)
        v1_ptr = v_ptr + t * stride_vt + heads * stride_vh + cols
        vc = v_cache_ptr + block * stride_vcb + offset * stride_vct + heads * stride_vch + cols
        v1 = tl.load(v1_ptr, mask=mask, other=0.0)
        v2 = tl.load(v1_ptr + HALF, mask=mask, other=0.0)
        tl.store(vc, _to_cache(v1, v_scale_ptr, QUANT).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + HALF, _to_cache(v2, v_scale_ptr, QUANT).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As tokenq_kernels.rotary_kv.rotary_store_kv_ref, with q and k rotated in place (strided views of the qkv
    output are fine)."""
    T = positions.shape[0]
    if T == 0:
        return q, k
    qv, kv, vv = q.view(T, -1, head_dim), k.view(T, -1, head_dim), v.view(T, -1, head_dim)
    if (qv.stride(2) != 1 or kv.stride(2) != 1 or vv.stride(2) != 1 or cos_sin_cache.stride(1) != 1
            or k_cache.stride(3) != 1 or v_cache.stride(3) != 1):
        raise ValueError("rotary_store_kv needs the head dimension contiguous")
    quant = k_cache.dtype == FP8
    if quant and (k_scale is None or v_scale is None):
        k_scale = v_scale = torch.ones(1, dtype=torch.float32, device=q.device)
    half = head_dim // 2
    pdl = pdl_options(q)
    _rotary_store_kv_kernel[(T,)](
        positions, qv, kv, vv, cos_sin_cache, k_cache, v_cache, slot_mapping,
        k_scale if quant else q, v_scale if quant else q,
        qv.stride(0), qv.stride(1), kv.stride(0), kv.stride(1), vv.stride(0), vv.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=qv.shape[1], NUM_KV_HEADS=kv.shape[1], BLOCK_QH=next_pow2(qv.shape[1]),
        BLOCK_KH=next_pow2(kv.shape[1]), HALF=half, BLOCK_HALF=next_pow2(half), CACHE_BLOCK=k_cache.shape[1],
        QUANT=quant, num_warps=4, **pdl,
    )
    return q, k
