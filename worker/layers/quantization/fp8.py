"""FP8 W8A8: e4m3 weights with a float32 scale per output row, activations quantized per token at run time.

A 16/32-bit checkpoint is quantized row by row as its tensors are loaded (the full-precision weights never
sit on the device whole), each row's scale picked by fp8_weight.quantize_weight_rows with the gain of the
norm that feeds the layer where there is one (`layer.input_gain`); an FP8 checkpoint's weights and
`weight_scale` rows are copied as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenq_kernels.fp8 import FP8, QuantizedInput, fp8_linear
from worker.layers.quantization.base import LinearMethod, copy_rows
from worker.layers.quantization.fp8_weight import quantize_weight_rows


class Fp8LinearMethod(LinearMethod):
    name = "fp8"
    takes_quantized_input = True

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(output_size, dtype=torch.float32), requires_grad=False)
        # Made from the weight when the checkpoint is not in FP8, so a checkpoint need not carry it.
        layer.weight_scale.optional_in_checkpoint = True

    def load(self, layer: nn.Module, param: nn.Parameter, offset: int, loaded: torch.Tensor) -> None:
        if param is layer.weight and loaded.dtype != FP8:
            q, scale = quantize_weight_rows(loaded.to(param.device), layer.input_gain)
            copy_rows(param, offset, q)
            copy_rows(layer.weight_scale, offset, scale.view(-1))
        elif param is layer.weight_scale:
            copy_rows(param, offset, loaded.reshape(-1).float())
        else:  # FP8 weight rows as they are, or the bias
            copy_rows(param, offset, loaded)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedInput, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)
