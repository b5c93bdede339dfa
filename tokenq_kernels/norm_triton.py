"""Triton RMSNorm, plain and fused with the residual add: one program per row, statistics in float32.

Rounds where the reference rounds (the sum to the residual's dtype, the normalized row to x's dtype before
the weight), so both agree to the last bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs


@triton.jit
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, n_cols, eps, cols, mask,
                 HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """One row in registers: x (+ residual, stored to res_out rounded to its dtype), normalized and rounded to
    that dtype, and the norm's weight in float32. Shared by the plain norm and the FP8 one (fp8_triton.py).
    The weight, which no kernel writes, loads before the wait for the kernel that writes x (pdl.py)."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    return (xf * rstd).to(x.dtype), w


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    normed, w = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, n_cols, eps,
                             cols, mask, HAS_RESIDUAL, PDL)
    tl.store(out_ptr + row * stride_o + cols, (normed.to(tl.float32) * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        ro2 = res_out.view(-1, n)
    else:
        r2 = ro2 = res_out = x2  # unused
    if rows == 0:
        return out, res_out
    block = next_pow2(n)
    pdl = pdl_options(x2)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1 or weight.stride(0) != 1:
        raise ValueError("rms_norm needs rows with unit stride")
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out2, ro2,
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        n, eps,
        BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block // 512)), **pdl,
    )
    return out, res_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), as the reference."""
    return _launch(x, residual, weight, eps)
