"""Triton SiLU-and-multiply: reads gate and up halves of each row once, writes silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    release_dependents(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    # silu is rounded to the input dtype before the product, as torch's F.silu(gate) * up does.
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] holding gate then up -> [..., I]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        pdl = pdl_options(x2)
        _silu_and_mul_kernel[(rows, triton.cdiv(n, _BLOCK))](
            x2, out, x2.stride(0), out.view(-1, n).stride(0), n, BLOCK=_BLOCK, num_warps=4, **pdl
        )
    return out
