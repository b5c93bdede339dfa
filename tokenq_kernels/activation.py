"""SiLU-and-multiply of the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenq_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    from tokenq_kernels.activation_triton import silu_and_mul_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] holding gate then up; returns silu(gate) * up: [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
