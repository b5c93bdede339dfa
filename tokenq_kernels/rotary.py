"""Rotary position embedding in the Hugging Face "rotate_half" (neox) layout."""

from __future__ import annotations

import torch

from tokenq_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    from tokenq_kernels.rotary_triton import rotary_triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq*D], k: [T, Hkv*D]; cos_sin_cache: [max_pos, D] holding cos then sin of each frequency.

    Returns new rotated tensors of the input shapes.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(-2).chunk(2, dim=-1)  # [T, 1, D/2]
    T = positions.shape[0]
    q_out = _rotate(q.view(T, -1, head_dim), cos, sin).view(q.shape)
    k_out = _rotate(k.view(T, -1, head_dim), cos, sin).view(k.shape)
    return q_out, k_out


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the rotated (q, k). Use the returned tensors: on CUDA they are q and k, rotated in place."""
    if use_triton(q):
        return rotary_triton(positions, q, k, cos_sin_cache, head_dim)
    return rotary_ref(positions, q, k, cos_sin_cache, head_dim)
