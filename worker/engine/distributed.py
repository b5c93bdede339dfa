"""The tensor-parallel group: rank, size, collectives, and how heads split over ranks.

One process per rank. The model's collectives run on the default group (NCCL on CUDA, gloo on a CPU); the
host-side step messages from rank 0 run on a gloo group beside it (`cpu_group`), so that on CUDA they
need no device copy. World size 1 (no group at all) until more ranks are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

IDLE_TIMEOUT = timedelta(days=365)

_cpu_group: dist.ProcessGroup | None = None
_forced_single = False  # inside single_rank(): layers are built whole (random weights made at full shape)


def tp_rank() -> int:
    if _forced_single:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    if _forced_single:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def single_rank() -> Iterator[None]:
    """Layers built inside see one rank: the whole tensors, as a checkpoint holds them."""
    global _forced_single
    prev, _forced_single = _forced_single, True
    try:
        yield
    finally:
        _forced_single = prev


def init_tensor_parallel(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Joins the group of `world_size` ranks that rendezvous on 127.0.0.1:`port`."""
    global _cpu_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    # The other ranks wait for rank 0's next step on the host group for as long as the engine idles.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=IDLE_TIMEOUT, **kwargs)
    _cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend != "gloo" else dist.group.WORLD


def destroy_tensor_parallel() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def cpu_group() -> dist.ProcessGroup:
    if _cpu_group is None:
        raise RuntimeError("the tensor-parallel group is not initialised")
    return _cpu_group


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


def agree(values: list[float], op: str = "min") -> list[float]:
    """The same values on every rank: their minimum (or maximum) over the group."""
    if tp_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=cpu_group())
    return t.tolist()


@dataclass(frozen=True)
class HeadShard:
    """This rank's attention heads: query heads [q_start, q_start + num_heads), KV heads likewise."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_shard(total_heads: int, total_kv_heads: int, size: int, rank: int) -> HeadShard:
    """KV heads spread over ranks as evenly as they go (contiguous, counts differing by at most one), each
    with its group of query heads; with fewer KV heads than ranks, each KV head is replicated on
    size / total_kv_heads ranks that split its query heads."""
    if total_heads % total_kv_heads:
        raise ValueError(f"{total_heads} query heads do not group over {total_kv_heads} KV heads")
    group = total_heads // total_kv_heads
    if total_kv_heads >= size:
        base, extra = divmod(total_kv_heads, size)
        kv_count = base + (rank < extra)
        kv_start = rank * base + min(rank, extra)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    replicas = size // total_kv_heads
    if size % total_kv_heads or group % replicas:
        raise ValueError(f"{total_kv_heads} KV heads with {total_heads} query heads cannot be split over "
                         f"{size} ranks; use a size that divides the KV heads or is a multiple of them")
    per = group // replicas
    kv = rank // replicas
    return HeadShard(kv * group + (rank % replicas) * per, per, kv, 1)
