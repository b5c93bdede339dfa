"""Rotary embedding and the KV-cache store of one attention layer's step in one pass.

Each token's keys are read once, rotated, and written both back (attention over the step's own queries reads
them there) and into their cache slot; its values go to the cache and its queries are rotated in place. At
batch 1 the two kernels it replaces are each mostly launch, so one launch a layer is what this saves.
"""

from __future__ import annotations

import torch

from tokenq_kernels.dispatch import HAS_TRITON, use_triton
from tokenq_kernels.kv_cache import store_kv_ref
from tokenq_kernels.rotary import rotary_ref

if HAS_TRITON:
    from tokenq_kernels.rotary_kv_triton import rotary_store_kv_triton


def rotary_store_kv_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq*D], k and v [T, Hkv*D] -> the rotated (q, k); the rotated k and v stored at slot_mapping."""
    q, k = rotary_ref(positions, q, k, cos_sin_cache, head_dim)
    T = positions.shape[0]
    store_kv_ref(k.view(T, -1, head_dim), v.view(T, -1, head_dim), k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k


def rotary_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Use the returned tensors: on CUDA they are q and k, rotated in place."""
    if use_triton(q):
        return rotary_store_kv_triton(positions, q, k, v, cos_sin_cache, head_dim, k_cache, v_cache, slot_mapping,
                                      k_scale, v_scale)
    return rotary_store_kv_ref(positions, q, k, v, cos_sin_cache, head_dim, k_cache, v_cache, slot_mapping,
                               k_scale, v_scale)
