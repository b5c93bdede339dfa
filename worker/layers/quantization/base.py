"""What a quantization method does for a linear layer: create its parameters, write loaded rows into them,
and compute its forward. Loaded tensors reach `load` already cut to this rank's shard (worker/layers/linear.py)."""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.gemv import linear


def copy_rows(param: nn.Parameter, offset: int, loaded: torch.Tensor) -> None:
    """param[offset : offset + len(loaded)] = loaded, with a clear error where the shapes disagree."""
    if loaded.dim() == 0 or offset + loaded.shape[0] > param.shape[0] or loaded.shape[1:] != param.shape[1:]:
        raise ValueError(f"tensor of shape {tuple(loaded.shape)} does not fit rows {offset}.. of a parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.narrow(0, offset, loaded.shape[0]).copy_(loaded)


class LinearMethod:
    name = "none"
    # The layer's forward takes an activation already quantized (tokenq_kernels.fp8.QuantizedInput), so the op that
    # produces it (RMSNorm, SiLU-and-multiply) may quantize it in the same kernel.
    takes_quantized_input = False

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        """Registers layer.weight [output_size, input_size] and any scales, in the default dtype."""
        raise NotImplementedError

    def load(self, layer: nn.Module, param: nn.Parameter, offset: int, loaded: torch.Tensor) -> None:
        """Writes rows of a checkpoint tensor (this rank's part) into param from row `offset` on."""
        copy_rows(param, offset, loaded)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias, layer.cpu_packed)
