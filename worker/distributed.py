"""Tensor-parallel group: rank, size and collectives. World size 1 until more GPUs are used."""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sums t over the group in place; a no-op at world size 1."""
    if tp_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates each rank's t along dim; t itself at world size 1."""
    n = tp_size()
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)
