"""Triton FP8 kernels: per-row (per-token) quantization, alone and fused into RMSNorm and SiLU-and-multiply,
and the GEMV of one row against an FP8 weight (decode at batch 1, where the weight read is everything).

Every kernel rounds where its reference in tokenq_kernels/fp8.py rounds (the norm and the activation to the input
dtype before the scale is taken), so both pick the same scale and almost always the same e4m3 codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2
from tokenq_kernels.fp8 import FP8, FP8_MAX, MIN_AMAX, QuantizedInput
from tokenq_kernels.gemv import GemvConfig
from tokenq_kernels.gemv_triton import weight_tile
from tokenq_kernels.norm_triton import rms_norm_row
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs

_MAX = tl.constexpr(FP8_MAX)  # jitted code reads globals only as constexprs
_FLOOR = tl.constexpr(MIN_AMAX)
_CODE_SCALE = tl.constexpr(1.0 / 512)  # a quantized x's e4m3 codes in float16 products (see _fp8_gemv_kernel)
_GROUP = 8  # products a quantized x's GEMV sums in float16
_CHUNK = 2048  # columns a program handles per pass of a long row


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Two passes over a row: its max |x|, then x / scale."""
    release_dependents(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=start + cols < n_cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0), _FLOOR) / _MAX
    tl.store(s_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -_MAX, _MAX)
        tl.store(q_ptr + row * stride_q + start + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., 1])."""
    n = x.shape[-1]
    x2 = _rows(x)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        block = min(_CHUNK, next_pow2(n))
        pdl = pdl_options(x2)
        _quantize_rows_kernel[(rows,)](x2, q, scale, x2.stride(0), n, n, BLOCK=block, num_warps=4,
                                       **pdl)
    return q, scale


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr,
    stride_x, stride_r, stride_ro, n_cols, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    """One row in registers: (x + residual), its RMSNorm rounded as the reference rounds, then quantized."""
    release_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    normed, w = rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, n_cols, eps,
                             cols, mask, HAS_RESIDUAL, PDL)
    y = (normed.to(tl.float32) * w).to(normed.dtype).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(y), 0), _FLOOR) / _MAX
    tl.store(s_ptr + row, scale)
    q = tl.clamp(y / scale, -_MAX, _MAX)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def rms_norm_quant_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[QuantizedInput, torch.Tensor | None]:
    """As tokenq_kernels.fp8.rms_norm_quant_ref: (quantized norm of x (+ residual), x + residual or None)."""
    n = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    r2 = _rows(residual) if residual is not None else x2
    ro2 = res_out.view(-1, n) if res_out is not None else x2
    if rows:
        block = next_pow2(n)
        pdl = pdl_options(x2)
        _rms_norm_quant_kernel[(rows,)](
            x2, r2, weight, q, scale, ro2, x2.stride(0), r2.stride(0), ro2.stride(0), n, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)), **pdl,
        )
    return QuantizedInput(q, scale, x.dtype), res_out


@triton.jit
def _silu_and_mul_tile(base, offs, n_cols, mask):
    """silu(gate) * up for one tile of a row, rounded to the input dtype as the reference rounds it."""
    gate = tl.load(base + offs, mask=mask, other=0.0)
    up = tl.load(base + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    return ((g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32) * up).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, n_cols, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                               PDL: tl.constexpr):
    """ONE_PASS: the whole row in registers, read once. Otherwise (rows too long for that) two passes over
    gate and up: the max of silu(gate) * up, then the product / scale (recomputed)."""
    release_dependents(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    base = x_ptr + row * stride_x
    if ONE_PASS:
        mask = cols < n_cols
        act = _silu_and_mul_tile(base, cols, n_cols, mask)
        scale = tl.maximum(tl.max(tl.abs(act), 0), _FLOOR) / _MAX
        tl.store(s_ptr + row, scale)
        q = tl.clamp(act / scale, -_MAX, _MAX)
        tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            act = _silu_and_mul_tile(base, start + cols, n_cols, mask)
            amax = tl.maximum(amax, tl.abs(act))
        scale = tl.maximum(tl.max(amax, 0), _FLOOR) / _MAX
        tl.store(s_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            act = _silu_and_mul_tile(base, start + cols, n_cols, mask)
            q = tl.clamp(act / scale, -_MAX, _MAX)
            tl.store(q_ptr + row * n_cols + start + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


# Rows up to this many columns are read once, whole, by one program of up to 32 warps (a program per row
# of two passes was twice as slow at 256 rows of Llama-3-8B's 14,336).
_ONE_PASS_MAX = 32768


def silu_and_mul_quant_triton(x: torch.Tensor) -> QuantizedInput:
    """x [..., 2*I] (gate then up) -> silu(gate) * up quantized per row, [..., I]."""
    n = x.shape[-1] // 2
    x2 = _rows(x)
    rows = x2.shape[0]
    q = torch.empty(*x.shape[:-1], n, dtype=FP8, device=x.device)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    if rows and n:
        whole = next_pow2(n)
        one_pass = whole <= _ONE_PASS_MAX
        block = whole if one_pass else _CHUNK
        # About 64 columns a thread in one pass: 8 warps for Llama-3-8B's row, more for longer ones.
        warps = min(32, max(8, whole // 2048)) if one_pass else 4
        pdl = pdl_options(x2)
        _silu_and_mul_quant_kernel[(rows,)](x2, q, scale, x2.stride(0), n, BLOCK=block, ONE_PASS=one_pass,
                                            num_warps=warps, **pdl)
    return QuantizedInput(q, scale, x.dtype)


@triton.jit
def _gemv_tiles(w_ptrs, x_ptrs, k, offs_k, K, n_mask, EVEN: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] and x's [BLOCK_K] at K offset k."""
    w = weight_tile(w_ptrs, k, offs_k, K, n_mask, EVEN)
    if EVEN:
        return w, tl.load(x_ptrs)
    return w, tl.load(x_ptrs, mask=(k + offs_k) < K, other=0.0)


@triton.jit
def _gemv_products(acc, w, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   F16_PRODUCTS: tl.constexpr):
    if F16_PRODUCTS:
        x16 = (x.to(tl.float16) * _CODE_SCALE).to(tl.float16)
        p = w.to(tl.float16) * x16[None, :]
        acc += tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2).to(tl.float32)
    else:
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, EVEN: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, F16_PRODUCTS: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    """One row of x against BLOCK_N rows of the FP8 weight, reduced over K once, then the weight's row scales
    (and x's scale) applied to the sums.

    An x in 16 or 32 bits multiplies in float32. A quantized x with a 16-bit output multiplies in float16
    (F16_PRODUCTS), about half the instructions a weight byte, with roundings below the output's own: x's e4m3
    codes are scaled by 1/512 (a power of two, so exact), a product of two e4m3 values has at most 8 significant
    bits (exact in float16), and each run of GROUP products is summed in float16 (at most GROUP * 448 * 448 / 512
    in magnitude, far inside its range) before it joins the float32 sum.

    Under PDL the first weight tile and the weight's scales are loaded before the wait for the kernel that
    writes x: the weight is read while that kernel finishes."""
    release_dependents(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    if F16_PRODUCTS:
        acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w = weight_tile(w_ptrs, 0, offs_k, K, n_mask, EVEN)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    x = tl.load(x_ptrs, mask=offs_k < K, other=0.0)
    acc = _gemv_products(acc, w, x, BLOCK_N, BLOCK_K, GROUP, F16_PRODUCTS)
    for k in range(BLOCK_K, K, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w, x = _gemv_tiles(w_ptrs, x_ptrs, k, offs_k, K, n_mask, EVEN)
        acc = _gemv_products(acc, w, x, BLOCK_N, BLOCK_K, GROUP, F16_PRODUCTS)
    y = tl.sum(acc, axis=1) * w_scale
    if HAS_X_SCALE:
        x_scale = tl.load(xs_ptr)
        if F16_PRODUCTS:
            x_scale = x_scale / _CODE_SCALE
        y = y * x_scale
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def fp8_gemv_tiles(n: int, k: int, f16_products: bool = False) -> GemvConfig:
    """The FP8 GEMV's tiles. Products in float32 take the 16-bit GEMV's (tokenq_kernels/gemv.py), whose
    float32 tile they were measured with; products in float16 need fewer registers and take longer runs of K,
    as the sweep under PDL put first (tests/gpu/bench_gemv.py --fp8; docs/BENCHMARKS.md)."""
    if f16_products:
        block_k = min(2048, next_pow2(k))
        if n > 4096:  # qkv, gate/up
            return GemvConfig(block_n=8, block_k=block_k, num_warps=4, num_stages=1)
        if k > 4096:  # down: long rows, few of them
            return GemvConfig(block_n=8, block_k=block_k, num_warps=8, num_stages=1)
        return GemvConfig(block_n=4, block_k=block_k, num_warps=4, num_stages=1)  # o
    return GemvConfig(block_n=8 if n <= 4096 else 4, block_k=min(1024, next_pow2(k)), num_warps=4, num_stages=2)


def fp8_gemv_triton(
    x: torch.Tensor | QuantizedInput, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    tiles: GemvConfig | tuple[int, int] | None = None,
) -> torch.Tensor:
    """One row x [..., K] (16/32-bit or quantized) against weight [N, K] e4m3 with scales [N] -> [..., N]."""
    quantized = isinstance(x, QuantizedInput)
    xq = x.q if quantized else x
    dtype = x.dtype
    K, N = xq.shape[-1], weight.shape[0]
    x1 = xq.reshape(-1)
    if x1.numel() != K:
        raise ValueError(f"fp8 gemv takes one row, got {x1.numel() // max(K, 1)}")
    if weight.stride(-1) != 1:
        raise ValueError("fp8 gemv needs a weight with unit stride along K")
    y = torch.empty(*xq.shape[:-1], N, dtype=dtype, device=xq.device)
    f16_products = quantized and dtype.itemsize == 2
    cfg = fp8_gemv_tiles(N, K, f16_products) if tiles is None else GemvConfig(*tiles)
    block_n, block_k = cfg.block_n, cfg.block_k
    xs = x.scale if quantized else weight_scale  # the weight's scales stand in for no x scale
    pdl = pdl_options(xq)
    _fp8_gemv_kernel[(triton.cdiv(N, block_n),)](
        x1, xs, weight, weight_scale, bias if bias is not None else weight_scale, y, N, K, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP=min(_GROUP, block_k), EVEN=K % block_k == 0 and N % block_n == 0,
        HAS_X_SCALE=quantized, F16_PRODUCTS=f16_products, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
    )
    return y
