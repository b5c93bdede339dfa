"""FP8 matmuls with and without cuBLAS's fast accumulation (tokenq_kernels/fp8.py, FAST_ACCUM_MAX_K).

    python tests/gpu/explore_fp8_accumulation.py gemm     # torch._scaled_mm timings and error, 8B shapes
    python tests/gpu/explore_fp8_accumulation.py error    # fp8_linear against test_fp8_linear's reference
    python tests/gpu/explore_fp8_accumulation.py throughput exact|fast BENCH-THROUGHPUT-ARGS...

`throughput exact` runs `tokenq bench throughput` with fast accumulation off; `fast` as shipped."""

from __future__ import annotations

import sys

import torch

FP8 = torch.float8_e4m3fn
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x.float() / s).clamp(-448, 448).to(FP8), s


def _timed_ms(fn) -> float:
    """bench_kernels' CUDA-event median, with no L2 flush between launches (as run for docs/BENCHMARKS.md):
    each weight here is larger than the L2 already."""
    from tests.gpu.bench_kernels import timeit

    return timeit(fn, 40, torch.empty(1, device="cuda"))


def gemm() -> None:
    print(f"{'shape':8s} {'M':>5s} {'exact ms':>9s} {'fast ms':>9s} {'speedup':>8s} {'err exact':>10s} {'err fast':>10s}")
    total: dict[tuple[int, bool], float] = {}
    for m in (512, 8192):
        for name, (n, k) in SHAPES.items():
            wq, sw = _quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            xq, sx = _quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            ref = (xq.float() * sx) @ (wq.float() * sw).t()
            got = {}
            for fast in (False, True):
                def mm(xq=xq, wq=wq, sx=sx, sw=sw, fast=fast):
                    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)
                err = ((mm().float() - ref).norm() / ref.norm()).item()
                got[fast] = (_timed_ms(mm), err)
                total[(m, fast)] = total.get((m, fast), 0.0) + got[fast][0]
            print(f"{name:8s} {m:5d} {got[False][0]:9.4f} {got[True][0]:9.4f} {got[False][0] / got[True][0]:8.3f} "
                  f"{got[False][1]:10.2e} {got[True][1]:10.2e}")
    for m in (512, 8192):
        print(f"one layer's four GEMMs at M={m}: exact {total[(m, False)]:.4f} ms, fast {total[(m, True)]:.4f} ms, "
              f"{total[(m, False)] / total[(m, True)]:.3f}x")


def error() -> None:
    import tokenq_kernels.fp8 as fp8
    from tests.gpu.test_fp8_gpu import check_fp8_linear

    torch.manual_seed(0)
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        for rows in (512, 8192):
            errs = {}
            for mode, max_k in (("exact", 0), ("fast", 1 << 30)):
                fp8.FAST_ACCUM_MAX_K = max_k
                try:
                    errs[mode] = f"{check_fp8_linear(rows, n, k, torch.bfloat16, 'cuda'):.2e}"
                except AssertionError as e:
                    errs[mode] = str(e).rsplit(" ", 1)[-1] + " (over the tolerance)"
            print(f"{n}x{k} rows={rows}: exact {errs['exact']}, fast {errs['fast']}")


def throughput(mode: str) -> None:
    import tokenq_kernels.fp8 as fp8
    from tokenq.bench import gpu_common as gc
    from tokenq.bench.throughput import configure, main

    if mode == "exact":
        fp8.FAST_ACCUM_MAX_K = 0
    print("FAST_ACCUM_MAX_K", fp8.FAST_ACCUM_MAX_K)
    gc.standalone(configure, main)


if __name__ == "__main__":
    what = sys.argv.pop(1)
    if what == "throughput":
        throughput(sys.argv.pop(1))
    else:
        {"gemm": gemm, "error": error}[what]()
