"""FP8 (float8 e4m3) quantization and matmuls: W8A8 linear layers with a scale per weight row (output
channel) and a scale per activation row (token), computed at run time, so no calibration data is needed.

A row is quantized as q = clamp(x / s, -448, 448) in e4m3 with s = max|x| / 448, and read back as q * s.
The product y = (xq * sx) @ (wq * sw).T = (xq @ wq.T) * sx * sw.T is what `torch._scaled_mm` computes with
row-wise scales (on CUDA and on the CPU). A decode row of one token is the weight read alone, so at batch 1
CUDA takes our Triton GEMV over the FP8 weight instead (tokenq_kernels/fp8_triton.py).

The quantization may be fused into the op that produces the activation (RMSNorm, SiLU-and-multiply): those
return a QuantizedInput, which the FP8 linear takes as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenq_kernels import gemv
from tokenq_kernels.activation import silu_and_mul, silu_and_mul_ref
from tokenq_kernels.dispatch import HAS_TRITON, use_triton
from tokenq_kernels.norm import rms_norm_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# A row of zeros gets this floor instead of a zero scale (x / 0); its values quantize to zero either way.
MIN_AMAX = 1e-12

class QuantizedInput(NamedTuple):
    """An activation already in FP8: q [..., K] e4m3, scale [..., 1] float32, and the dtype it came in."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


# ---- references ------------------------------------------------------------------------------------


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., 1]) with one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def rms_norm_quant_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[QuantizedInput, torch.Tensor | None]:
    """RMSNorm (with the residual add when given) whose output is quantized per row; returns
    (the quantized norm, x + residual or None)."""
    if residual is not None:
        x = residual = x + residual
    normed = rms_norm_ref(x, weight, eps)
    q, scale = quantize_rows_ref(normed)
    return QuantizedInput(q, scale, normed.dtype), residual


def silu_and_mul_quant_ref(x: torch.Tensor) -> QuantizedInput:
    act = silu_and_mul_ref(x)
    q, scale = quantize_rows_ref(act)
    return QuantizedInput(q, scale, act.dtype)


def fp8_gemv_ref(
    x: torch.Tensor | QuantizedInput, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The decode GEMV's reference: float32 products of the (dequantized) operands, in x's dtype."""
    xf, dtype = (dequantize_rows(x.q, x.scale), x.dtype) if isinstance(x, QuantizedInput) else (x.float(), x.dtype)
    y = F.linear(xf, weight.float()) * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def scaled_mm_ref(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq [M, K], x_scale [M, 1], weight [N, K], weight_scale [N] -> [M, N], through float32."""
    y = F.linear(dequantize_rows(xq, x_scale), dequantize_rows(weight, weight_scale[:, None]))
    return (y if bias is None else y + bias.float()).to(out_dtype)


# ---- dispatchers -----------------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return fp8_triton.quantize_rows_triton(x)
    return quantize_rows_ref(x)


def rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[QuantizedInput, torch.Tensor | None]:
    if use_triton(x):
        return fp8_triton.rms_norm_quant_triton(x, residual, weight, eps)
    return rms_norm_quant_ref(x, residual, weight, eps)


def silu_and_mul_quant(x: torch.Tensor) -> QuantizedInput | torch.Tensor:
    """SiLU(gate) * up, quantized per row for the FP8 matmul that reads it. At rows the FP8 GEMV takes (it
    multiplies 16-bit x itself) the product stays 16-bit: its quantization would be work the GEMV does not need,
    on one program over one row (the plain SiLU spreads a row over many)."""
    if use_triton(x):
        if _takes_gemv(x):
            return silu_and_mul(x)
        return fp8_triton.silu_and_mul_quant_triton(x)
    return silu_and_mul_quant_ref(x)


# CUDA's FP8 tensor-core products accumulate in fewer bits than float32; cuBLAS's default adds the partial sums
# into float32 every few steps of K, fast accumulation only at the end. Fast is faster, and its error grows with
# K: it is used up to the K at which it was measured within bfloat16's tolerance (docs/BENCHMARKS.md and
# docs/fp8.md have the figures); longer sums stay exact.
FAST_ACCUM_MAX_K = 4096


def _scaled_mm_fits(n: int, k: int) -> bool:
    """torch._scaled_mm needs both matrix dimensions of the weight in multiples of 16."""
    return n % 16 == 0 and k % 16 == 0


def scaled_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """FP8 x FP8 with row-wise scales. CUDA's row-wise kernel writes bfloat16 only, so other dtypes are cast
    from it; shapes _scaled_mm refuses take the float32 reference."""
    n, k = weight.shape
    if not _scaled_mm_fits(n, k):
        return scaled_mm_ref(xq, x_scale, weight, weight_scale, bias, out_dtype)
    mm_dtype = torch.bfloat16 if xq.is_cuda else out_dtype
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.float(), scale_b=weight_scale.float().view(1, n),
                         out_dtype=mm_dtype, use_fast_accum=xq.is_cuda and k <= FAST_ACCUM_MAX_K)
    if bias is not None:
        y = y + bias.to(mm_dtype)
    return y.to(out_dtype)


# Rows of x up to which CUDA reads the weight with the GEMV instead of _scaled_mm (TOKENQ_GEMV=cublas and
# the benches' --gemv cublas turn it off, as they do the 16-bit GEMV).
GEMV_MAX_ROWS = 1


def _takes_gemv(x: torch.Tensor) -> bool:
    """Whether an FP8 linear over x's rows reads its weight with the GEMV (see fp8_linear)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return gemv.ENABLED and 0 < rows <= GEMV_MAX_ROWS and use_triton(x)


def fp8_linear(
    x: torch.Tensor | QuantizedInput, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., K] (16/32-bit, or already quantized), weight [N, K] e4m3, weight_scale [N] float32 -> [..., N]."""
    q = x.q if isinstance(x, QuantizedInput) else x
    lead, k = q.shape[:-1], q.shape[-1]
    if _takes_gemv(q):
        return fp8_triton.fp8_gemv_triton(x, weight, weight_scale, bias)
    if isinstance(x, QuantizedInput):
        xq, x_scale, dtype = x.q.reshape(-1, k), x.scale.reshape(-1, 1), x.dtype
    else:
        xq, x_scale = quantize_rows(x.reshape(-1, k))
        dtype = x.dtype
    return scaled_mm(xq, x_scale, weight, weight_scale, bias, dtype).view(*lead, weight.shape[0])


if HAS_TRITON:  # a module reference, so either module may be imported first
    import tokenq_kernels.fp8_triton as fp8_triton
