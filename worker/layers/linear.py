"""Tensor-parallel linear layers. Each parameter carries a weight_loader that cuts this rank's shard
out of the full checkpoint tensor, so tensor parallelism is a loading concern and forward stays one matmul
(kernels.gemv.linear: F.linear, or our GEMV at decode batch sizes where it reads weights faster)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.gemv import linear
from worker.distributed import all_reduce, tp_rank, tp_size


def _divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not divisible by the tensor-parallel size {d}")
    return n // d


class _Linear(nn.Module):
    """weight [output_size, input_size] (this rank's shard); tp_dim: the dimension split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        return loaded.chunk(self.tp_size, dim)[self.tp_rank] if self.tp_size > 1 else loaded

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if self.tp_dim is not None and loaded_weight.dim() > self.tp_dim:
            loaded_weight = self._shard(loaded_weight, self.tp_dim)
        _copy(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape {tuple(src.shape)} does not fit parameter shape {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(_Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, None)


class ColumnParallelLinear(_Linear):
    """Splits the output features across ranks; the output stays sharded (no communication)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, _divide(output_size, tp_size()), bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up: shard ids 0, 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _copy(param.data.narrow(0, offset, size), self._shard(loaded_weight, 0))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: weight [(Hq + 2*Hkv) * D, hidden] per rank; shard ids "q", "k", "v"."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
    ):
        n = tp_size()
        self.head_size = head_size
        self.num_heads = _divide(total_num_heads, n)
        # With more ranks than KV heads each rank keeps a replica of one KV head.
        self.num_kv_heads = max(1, total_num_kv_heads // n)
        self.kv_replicas = max(1, n // total_num_kv_heads)
        out = (total_num_heads + 2 * self.num_kv_heads * n) * head_size
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard_id == "q":
            offset, size, idx = 0, q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, idx = q_size, kv_size, self.tp_rank // self.kv_replicas
        elif shard_id == "v":
            offset, size, idx = q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        _copy(param.data.narrow(0, offset, size), loaded_weight.narrow(0, idx * size, size))


class RowParallelLinear(_Linear):
    """Splits the input features across ranks; the partial outputs are summed with all_reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(_divide(input_size, tp_size()), output_size, bias, 1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.dim() == 1:  # the bias is whole on every rank and added once, by rank 0
            _copy(param.data, loaded_weight)
        else:
            _copy(param.data, self._shard(loaded_weight, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y) if self.tp_size > 1 else y
