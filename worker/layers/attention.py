"""Paged attention layer: stores the step's keys/values in its cache, then attends over block tables.

With an FP8 cache the layer's k_scale and v_scale (one float32 each, 1 unless a checkpoint brings its own)
divide what is stored and multiply what is read."""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.attention import paged_attention
from tokenq_kernels.kv_cache import store_kv
from worker.layers.context import get_attention_metadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale
        # Views of the model runner's one KV tensor, [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq*D], k and v [T, Hkv*D] -> [T, Hq*D]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention has no KV cache: call model.bind_kv_cache(kv) before forward")
        meta = get_attention_metadata()
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, k, v, self.k_scale, self.v_scale)
        return out.reshape(T, self.num_heads * self.head_dim)
