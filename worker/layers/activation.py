"""SiLU-and-multiply over the fused gate/up projection; quantized to FP8 in the same kernel where the next
layer takes FP8 input (quantize_output)."""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.activation import silu_and_mul
from tokenq_kernels.fp8 import silu_and_mul_quant


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quantize_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_quant(x) if self.quantize_output else silu_and_mul(x)
