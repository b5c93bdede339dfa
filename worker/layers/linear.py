"""Tensor-parallel linear layers. Each parameter carries a weight_loader that cuts this rank's shard
out of the full checkpoint tensor, so tensor parallelism is a loading concern and forward stays one matmul
(tokenq_kernels.gemv.linear: F.linear, or our GEMV at decode batch sizes where it reads weights faster).

A quantization method (worker/layers/quantization) owns the parameters and the forward: the layers here
only say which rows of their output a loaded tensor fills, and every per-row tensor (weight, bias, the FP8
row scales) is cut the same way. A row-parallel layer splits the weight's columns only; its per-row
tensors stay whole on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.distributed import all_reduce, head_shard, tp_rank, tp_size
from worker.layers.quantization import current_linear_method


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
        self.output_size = output_size
        # The per-channel gain of this layer's input where the model knows it (the weight of the norm in front),
        # read when a quantization method picks the scales of weights it quantizes while they load.
        self.input_gain: torch.Tensor | None = None
        self.cpu_packed: torch.Tensor | None = None  # the weight in oneDNN's layout on a CPU (models.cpu_packing)
        self.quant_method = current_linear_method()
        self.quant_method.create_weights(self, input_size, output_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def _shard(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        return loaded.chunk(self.tp_size, dim)[self.tp_rank] if self.tp_size > 1 else loaded

    def _rows(self, shard_id) -> tuple[int, int]:
        """(first row, row count) of this rank's output that the checkpoint tensor `shard_id` fills."""
        return 0, self.output_size

    def _my_part(self, loaded: torch.Tensor, shard_id) -> torch.Tensor:
        """This rank's rows of a loaded per-row tensor."""
        return self._shard(loaded, 0) if self.tp_dim == 0 else loaded

    def _my_columns(self, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's input columns of a loaded weight (row-parallel layers)."""
        return self._shard(loaded, 1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        offset, size = self._rows(shard_id)
        if loaded_weight.numel() == 1 and param.dim() == 1:  # one scale for the whole tensor: every row's
            part = loaded_weight.reshape(1).expand(size)
        else:
            part = self._my_part(loaded_weight, shard_id)
            if self.tp_dim == 1 and param is self.weight:
                part = self._my_columns(part)
        self.quant_method.load(self, param, offset, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


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

    def _rows(self, shard_id) -> tuple[int, int]:
        return sum(self.output_sizes[:shard_id]) // self.tp_size, self.output_sizes[shard_id] // self.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: weight [(Hq + 2*Hkv) * D, hidden] of this rank's heads; shard ids "q",
    "k", "v". Heads split as distributed.head_shard says (KV heads replicated where ranks outnumber them)."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
    ):
        self.head_size = head_size
        self.shard = head_shard(total_num_heads, total_num_kv_heads, tp_size(), tp_rank())
        self.num_heads = self.shard.num_heads
        self.num_kv_heads = self.shard.num_kv_heads
        _Linear.__init__(self, hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_size, bias, 0)

    def _rows(self, shard_id) -> tuple[int, int]:
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard_id == "q":
            return 0, q_size
        if shard_id == "k":
            return q_size, kv_size
        if shard_id == "v":
            return q_size + kv_size, kv_size
        raise ValueError(f"unknown qkv shard id {shard_id!r}")

    def _my_part(self, loaded: torch.Tensor, shard_id) -> torch.Tensor:
        size = self._rows(shard_id)[1]
        start = (self.shard.q_start if shard_id == "q" else self.shard.kv_start) * self.head_size
        return loaded.narrow(0, start, size)


class RowParallelLinear(_Linear):
    """Splits the input features across ranks; the partial outputs are summed with all_reduce. `input_shard`
    (start, size) takes an uneven slice (attention heads that do not divide evenly), else an equal one."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 input_shard: tuple[int, int] | None = None):
        if input_shard is None:
            size = _divide(input_size, tp_size())
            input_shard = (tp_rank() * size, size)
        self.input_start, self.input_local = input_shard
        super().__init__(self.input_local, output_size, bias, 1)

    def _my_columns(self, loaded: torch.Tensor) -> torch.Tensor:
        return loaded.narrow(1, self.input_start, self.input_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is whole on every rank and added once, by rank 0.
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y) if self.tp_size > 1 else y
