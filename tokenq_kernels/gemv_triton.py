"""Triton matmul for a few rows against a large weight (decode at small batch): y = x @ w.T (+ bias).

At batch 1 a decode step is nothing but reading the weights once, so what matters is how close each matmul
comes to the card's memory bandwidth. cuBLAS picks a GEMV per shape and some shapes come out slow (o_proj,
4096x4096, ran at about half the bandwidth of the others on an H100). This kernel streams each weight row
block once, with wide loads along K, and keeps every row of x (at most BLOCK_M) in registers:

- grid (N / BLOCK_N,): each program owns BLOCK_N output features and reads the whole of K for them;
- products accumulate in a [BLOCK_N, BLOCK_K] float32 tile per row, reduced over K once, at the end.

(A split-K variant was swept on the H200 and gained nothing at the Llama-3-8B shapes; it was dropped.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.gemv import GemvConfig
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs


@triton.jit
def weight_tile(w_ptrs, k, offs_k, K, n_mask, EVEN: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] at K offset k, masked unless the shapes divide into tiles (EVEN).
    Shared with the FP8 GEMV (fp8_triton.py)."""
    if EVEN:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=n_mask[:, None] & ((k + offs_k) < K)[None, :], other=0.0)


@triton.jit
def _load_tiles(w_ptrs, x_ptrs, k, offs_k, K, n_mask, m_mask, EVEN: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] and the rows of x [BLOCK_M, BLOCK_K] at K offset k."""
    w = weight_tile(w_ptrs, k, offs_k, K, n_mask, EVEN)
    if EVEN:
        return w, tl.load(x_ptrs)
    return w, tl.load(x_ptrs, mask=m_mask[:, None] & ((k + offs_k) < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    # Products accumulate elementwise in float32 and are reduced over K once, after the loop: the loop body
    # is loads and FMAs only. Each weight tile is read once for all BLOCK_M rows. One row (decode at batch
    # 1, the case the dispatcher sends here) keeps a 2-D tile, and under PDL loads its first weight tile
    # before waiting for the kernel that writes x (see tokenq_kernels/pdl.py).
    if BLOCK_M == 1:
        w = weight_tile(w_ptrs, 0, offs_k, K, n_mask, EVEN)
        wait_for_inputs(PDL)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc2 = w.to(tl.float32) * x.to(tl.float32)
        for k in range(BLOCK_K, K, BLOCK_K):
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w, x = _load_tiles(w_ptrs, x_ptrs, k, offs_k, K, n_mask, m_mask, EVEN)
            acc2 += w.to(tl.float32) * x.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        wait_for_inputs(PDL)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            w, x = _load_tiles(w_ptrs, x_ptrs, k, offs_k, K, n_mask, m_mask, EVEN)
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GemvConfig) -> torch.Tensor:
    """x [..., K] (few rows), weight [N, K] -> [..., N] in x's dtype; float32 accumulation."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("gemv needs a weight with unit stride along K")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], N)
    block_m = max(1, triton.next_power_of_2(M))
    pdl = pdl_options(x2)
    _gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
        x2, weight, bias if bias is not None else weight, y, M, N, K,  # the weight stands in for no bias
        x2.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN=K % cfg.block_k == 0 and N % cfg.block_n == 0 and M == block_m, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
    )
    return y.view(*x.shape[:-1], N)
