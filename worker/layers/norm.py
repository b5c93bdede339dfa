"""RMSNorm, optionally fused with the residual add that precedes it (as vLLM does), and with the FP8
quantization of its output where the next layer takes FP8 input (quantize_output)."""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.fp8 import rms_norm_quant
from tokenq_kernels.norm import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.quantize_output = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With it: (norm(x + residual), x + residual). The norm is a
        tokenq_kernels.fp8.QuantizedInput when quantize_output is set."""
        if self.quantize_output:
            normed, new_residual = rms_norm_quant(x, residual, self.weight, self.eps)
            return normed if residual is None else (normed, new_residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
