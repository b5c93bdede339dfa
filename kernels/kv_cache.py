"""Writing a step's new keys and values into the paged KV cache."""

from __future__ import annotations

import torch

from kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    from kernels.kv_cache_triton import store_kv_triton


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] (block * block_size + offset).

    Slots < 0 mark padding rows (a CUDA-graph batch padded to its captured size) and are skipped."""
    nb, bs, h, d = k_cache.shape
    slots = slot_mapping.long()
    if len(slots) and slots.min() < 0:  # a host sync, but the reference runs on the CPU
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
