"""Triton KV-cache store: one program per token copies its keys and values into their cache slot (an FP8
cache gets them divided by their scale and clamped to e4m3's range)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2
from tokenq_kernels.fp8 import FP8, FP8_MAX
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs

_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding rows of a CUDA-graph batch
        return
    block = slot // CACHE_BLOCK
    offset = slot % CACHE_BLOCK
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + heads * stride_vh + dims, mask=mask)
    if QUANT:
        k = tl.clamp(tl.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -_MAX, _MAX)
        v = tl.clamp(tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -_MAX, _MAX)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + heads * stride_kch + dims
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + heads * stride_vch + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k, v [T, Hkv, D] (strided views of the qkv output are fine); slots < 0 are skipped. An FP8 cache takes
    k / k_scale and v / v_scale (one-element float32 tensors; None: 1)."""
    T, h, d = k.shape
    if T == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("store_kv needs the head dimension contiguous")
    quant = k_cache.dtype == FP8
    if quant and (k_scale is None or v_scale is None):
        k_scale = v_scale = torch.ones(1, dtype=torch.float32, device=k.device)
    pdl = pdl_options(k)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if quant else k, v_scale if quant else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h, HEAD_DIM=d, BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d),
        CACHE_BLOCK=k_cache.shape[1], QUANT=quant,
        num_warps=4, **pdl,
    )
