"""Triton matmul for a few rows against a large weight (decode at small batch): y = x @ w.T (+ bias).

At batch 1 a decode step is nothing but reading the weights once, so what matters is how close each matmul
comes to the card's memory bandwidth. cuBLAS picks a GEMV per shape and some shapes come out slow (o_proj,
4096x4096, ran at about half the bandwidth of the others on an H100). This kernel streams each weight row
block once, with wide loads along K, and keeps every row of x (at most BLOCK_M) in registers:

- grid (N / BLOCK_N, SPLIT_K): each program owns BLOCK_N output features and one contiguous share of K;
- products accumulate in a [BLOCK_N, BLOCK_K] float32 tile per row, reduced over K once, at the end;
- SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] that a second kernel sums, casts and biases, for
  shapes with too few output blocks to keep every SM reading (no Llama-3-8B shape gained from it on an
  H200, so the dispatcher does not use it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gemv import GemvConfig


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    # Products accumulate elementwise in float32 and are reduced over K once, after the loop: the loop body
    # is loads and FMAs only. Each weight tile is read once for all BLOCK_M rows.
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_mask = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_mask = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(acc3, axis=2)
    out_mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    if PARTIAL:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _sum_splits_kernel(
    part_ptr, b_ptr, y_ptr, N, stride_ps, stride_pm, stride_ym,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + row * stride_pm + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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
    split = max(1, min(cfg.split_k, triton.cdiv(K, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), split) * cfg.block_k
    even = K % k_per_split == 0 and N % cfg.block_n == 0 and M == block_m
    b = bias if bias is not None else weight  # unused when HAS_BIAS is False
    grid = (triton.cdiv(N, cfg.block_n), split)
    if split == 1:
        _gemv_kernel[grid](
            x2, weight, b, y, M, N, K, k_per_split,
            x2.stride(0), weight.stride(0), y.stride(0), 0,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            EVEN=even, HAS_BIAS=bias is not None, PARTIAL=False,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        _gemv_kernel[grid](
            x2, weight, b, part, M, N, K, k_per_split,
            x2.stride(0), weight.stride(0), part.stride(1), part.stride(0),
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            EVEN=even, HAS_BIAS=False, PARTIAL=True,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        block = 1024
        _sum_splits_kernel[(M, triton.cdiv(N, block))](
            part, b, y, N, part.stride(0), part.stride(1), y.stride(0),
            SPLIT_K=split, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4,
        )
    return y.view(*x.shape[:-1], N)
