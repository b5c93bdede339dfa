"""Paged attention layer: rotates the step's queries and keys (when it has a rotary embedding), stores keys and
values in its cache, then attends over block tables. The rotation and the store are one kernel on CUDA.

With an FP8 cache the layer's k_scale and v_scale (one float32 each, 1 unless a checkpoint brings its own)
divide what is stored and multiply what is read."""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.attention import paged_attention
from tokenq_kernels.dense_decode import DenseDecodeKV
from tokenq_kernels.kv_cache import store_kv
from tokenq_kernels.rotary_kv import rotary_store_kv
from worker.layers.context import get_attention_metadata
from worker.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale
        self.rotary_emb = rotary_emb
        # Views of the model runner's one KV tensor, [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.dense_decode = DenseDecodeKV()  # the CPU decode's copy of the decoding sequences' KV
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32))

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attends over these caches from now on (views of the model runner's KV tensor)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.dense_decode.reserve(k_cache)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [T, Hq*D], k and v [T, Hkv*D] -> [T, Hq*D]; positions [T] for the rotary embedding."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention has no KV cache: call model.bind_kv_cache(kv) before forward")
        meta = get_attention_metadata()
        T = q.shape[0]
        kv_shape = (T, self.num_kv_heads, self.head_dim)
        if self.rotary_emb is None:
            store_kv(k.view(kv_shape), v.view(kv_shape), self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale,
                     self.v_scale)
        elif positions is None:
            raise ValueError("attention with a rotary embedding needs the tokens' positions")
        else:
            q, k = rotary_store_kv(positions, q, k, v, self.rotary_emb.cos_sin_cache, self.head_dim, self.k_cache,
                                   self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        q = q.view(T, self.num_heads, self.head_dim)
        k, v = k.view(kv_shape), v.view(kv_shape)
        out = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, k, v, self.k_scale, self.v_scale,
                              self.dense_decode)
        return out.reshape(T, self.num_heads * self.head_dim)
