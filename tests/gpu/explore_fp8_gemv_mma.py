"""A decode GEMV over FP8 weights on the tensor cores, against the shipped one (tokenq_kernels/fp8_triton.py),
at batch 1 on the Llama-3-8B shapes:

    python tests/gpu/explore_fp8_gemv_mma.py

The shipped GEMV widens every e4m3 weight to float32 and multiplies on the CUDA cores, so it issues several
instructions a weight byte and stays under the bandwidth the 16-bit GEMV reaches (docs/BENCHMARKS.md). Here
the quantized activation row is repeated to the 16 rows a
tensor-core product needs and the weight tile enters an FP8 product as stored: no per-element widening.
SWAP puts the weight tile on the left (weight rows x 16), else on the right (16 x weight rows). Compiled for
sm_90, only SWAP with 64-row tiles and 4 warps becomes an FP8 wgmma; the others are mma.sync on float16,
widened by the compiler. 64-row tiles leave N/64 programs (64 for o_proj), so SPLIT cuts K as well and the
partial rows are added atomically into a float32 output zeroed first (both kernels timed). Every variant
is checked against the reference before it is timed (as tests/gpu/bench_gemv.py times: in a CUDA graph, over
weight copies that never sit in L2).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu.bench_gemv import SHAPES, fp8_problem, gbs, rel_err, time_graph  # noqa: E402
from tokenq_kernels.fp8 import QuantizedInput  # noqa: E402
from tokenq_kernels.fp8_triton import fp8_gemv_triton  # noqa: E402


@triton.jit
def _fp8_gemv_mma_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, K, stride_wn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = K // SPLIT
    k_lo = tl.program_id(1) * part
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + k_lo + offs_k[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    else:
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_lo + part, BLOCK_K):
        w = tl.load(w_ptrs)
        x16 = tl.broadcast_to(tl.load(x_ptr + k + offs_k)[None, :], (16, BLOCK_K))  # 16 equal rows
        if SWAP:
            acc = tl.dot(w, tl.trans(x16), acc)
        else:
            acc = tl.dot(x16, tl.trans(w), acc)
        w_ptrs += BLOCK_K
    y = tl.max(acc, 1) if SWAP else tl.max(acc, 0)  # the 16 rows are equal
    y = y * tl.load(ws_ptr + offs_n) * tl.load(xs_ptr)
    if SPLIT > 1:
        tl.atomic_add(y_ptr + offs_n, y)
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


def gemv_mma(x: QuantizedInput, w: torch.Tensor, ws: torch.Tensor, swap: bool, block_n: int, block_k: int,
             warps: int, stages: int, split: int = 1) -> torch.Tensor:
    n, k = w.shape
    assert n % block_n == 0 and k % (block_k * split) == 0
    if split > 1:
        y = torch.zeros(1, n, dtype=torch.float32, device=w.device)
    else:
        y = torch.empty(1, n, dtype=x.dtype, device=w.device)
    _fp8_gemv_mma_kernel[(n // block_n, split)](x.q, x.scale, w, ws, y, k, w.stride(0), BLOCK_N=block_n,
                                                BLOCK_K=block_k, SWAP=swap, SPLIT=split, num_warps=warps,
                                                num_stages=stages)
    return y


def variants(k: int):
    for block_k, stages, split in itertools.product((128, 256), (3, 4), (1, 2, 4)):
        if k % (block_k * split) == 0:
            yield True, 64, block_k, 4, stages, split  # the FP8 wgmma
    for block_n, warps in itertools.product((16, 32), (1, 2)):
        yield False, block_n, 256, warps, 3, 1  # mma.sync, the weight widened to float16


def main() -> int:
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    total = {"shipped": 0.0, "best": 0.0}
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        n, k, per_step = SHAPES[name]
        weights, x, ref = fp8_problem(n, k)
        shipped = time_graph(lambda x, w: fp8_gemv_triton(x, w[0], w[1], None), weights, x)
        rows = []
        for v in variants(k):
            try:
                err = rel_err(gemv_mma(x, *weights[0], *v), ref)
                us = time_graph(lambda x, w, v=v: gemv_mma(x, w[0], w[1], *v), weights, x) if err < 1e-2 else math.nan
            except Exception as e:  # a variant that does not compile is a result, not a crash
                print(f"  {name} {v} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            rows.append((us, v, err))
        rows.sort(key=lambda r: (math.isnan(r[0]), r[0]))
        print(f"\n{name} ({n} x {k}): shipped GEMV {shipped:.1f} us, {gbs(n * k, shipped):.0f} GB/s")
        print("  swap block_n block_k warps stages split |    us   GB/s  vs shipped  rel.err")
        for us, v, err in rows[:10]:
            print(f"  {v[0]!s:>4} {v[1]:>7} {v[2]:>7} {v[3]:>5} {v[4]:>6} {v[5]:>5} | {us:6.1f} {gbs(n * k, us):6.0f} "
                  f"{shipped / us:>9.2f}x  {err:.1e}")
        total["shipped"] += per_step * shipped
        total["best"] += per_step * min(shipped, rows[0][0] if rows and not math.isnan(rows[0][0]) else shipped)
        del weights
        torch.cuda.empty_cache()
    print(f"\none decode step's FP8 matmuls (32 layers): shipped {total['shipped'] / 1e3:.3f} ms, best per shape "
          f"{total['best'] / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
