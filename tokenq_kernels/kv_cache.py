"""Writing a step's new keys and values into the paged KV cache.

A cache in FP8 (e4m3) holds x / scale with one scale per layer for keys and one for values (float32 tensors
of one element, read on the device so that CUDA graphs see later changes); attention multiplies it back.
"""

from __future__ import annotations

import torch

from tokenq_kernels.dispatch import HAS_TRITON, use_triton
from tokenq_kernels.fp8 import FP8, FP8_MAX

if HAS_TRITON:
    from tokenq_kernels.kv_cache_triton import store_kv_triton


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x as the cache stores it: cast, or for FP8 divided by the scale and clamped to e4m3's range."""
    if cache_dtype != FP8:
        return x.to(cache_dtype)
    xf = x.float() if scale is None else x.float() / scale.float()
    return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached values back in the compute dtype (FP8 ones times their scale)."""
    if x.dtype != FP8:
        return x.to(dtype)
    return (x.float() if scale is None else x.float() * scale.float()).to(dtype)


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] (block * block_size + offset).

    Slots < 0 mark padding rows (a CUDA-graph batch padded to its captured size) and are skipped."""
    nb, bs, h, d = k_cache.shape
    slots = slot_mapping.long()
    if len(slots) and slots.min() < 0:  # a host sync, but the reference runs on the CPU
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        x = to_cache_dtype(x, cache.dtype, scale)
        if cache.dtype == FP8:  # torch's CPU index_copy_ has no float8 kernel; the bytes are the same
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(nb * bs, h, d).index_copy_(0, slots, x)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k_scale, v_scale: the FP8 cache's scales (None: 1)."""
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
