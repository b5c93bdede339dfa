"""Correctness, then speed, of the Triton kernels on one GPU, in one run:

    python tests/gpu/bench_kernels.py [--skip-checks] [--sweep] [--runs N]

1. Every check of tests/gpu/test_kernels_triton.py at model-like sizes: PASS/FAIL per check, per kernel.
2. Decode attention on a Llama-3-8B layer (32 q heads, 8 KV heads, D=128, bf16, block size 16) at batch
   1/32/256 and context 512/4096: Triton (split-K by heuristic, and forced off) against the torch
   reference, median of many runs timed with CUDA events, L2 flushed before each, with the achieved
   bandwidth (bytes of K and V read / time). Then a prefill, and the small kernels.
3. --sweep: decode tile shapes (BLOCK_N, stages, warps) and split counts, to tune the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16


def timeit(fn: Callable[[], object], runs: int, flush: torch.Tensor) -> float:
    """Median milliseconds of fn over `runs` launches, each after an L2 flush, timed by CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_correctness() -> bool:
    from tests.gpu.test_kernels_triton import run_checks

    results = run_checks("cuda", tiny=False)
    per_kernel: dict[str, list[bool]] = defaultdict(list)
    for name, err in results.items():
        print(f"{'PASS' if err is None else 'FAIL'}  {name}" + ("" if err is None else f"\n      {err}"))
        per_kernel[name.split()[0]].append(err is None)
    print("\nper kernel:")
    for kernel, oks in per_kernel.items():
        print(f"  {'PASS' if all(oks) else 'FAIL'}  {kernel} ({sum(oks)}/{len(oks)})")
    return all(err is None for err in results.values())


def decode_step(batch: int, ctx: int):
    """A decode batch of `batch` sequences of `ctx` tokens over randomly placed blocks."""
    from tests.gpu.test_kernels_triton import make_step

    k_cache, v_cache, meta = make_step([1] * batch, [ctx] * batch, HKV, D, BLOCK, DTYPE, "cuda")
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    return q, k_cache, v_cache, meta


def bench_decode(runs: int, flush: torch.Tensor) -> None:
    from tokenq_kernels.attention import paged_attention_ref
    from tokenq_kernels.attention_triton import choose_num_splits, launch_config, paged_attention_triton
    from tokenq_kernels.dispatch import sm_count

    print(f"\ndecode attention, Llama-3-8B layer (Hq={HQ}, Hkv={HKV}, D={D}, {DTYPE}, block {BLOCK}), "
          f"{torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} | {'triton ms':>9} {'GB/s':>6} | {'no split':>9} {'GB/s':>6} |"
          f" {'torch ms':>9} {'GB/s':>6} | {'speedup':>7}")
    scale = D**-0.5
    for batch in (1, 32, 256):
        for ctx in (512, 4096):
            q, k_cache, v_cache, meta = decode_step(batch, ctx)
            kv_bytes = 2 * batch * ctx * HKV * D * DTYPE.itemsize
            splits = choose_num_splits(batch * HKV, ctx, sm_count(q.device), launch_config(1, HQ // HKV, DTYPE).split_keys)
            args = (q, k_cache, v_cache, meta, scale)
            t_tri = timeit(partial(paged_attention_triton, *args), runs, flush)
            t_one = timeit(partial(paged_attention_triton, *args, num_splits=1), runs, flush)
            t_ref = timeit(partial(paged_attention_ref, *args), max(5, runs // 4), flush)

            def bw(ms: float, kv_bytes: int = kv_bytes) -> float:
                return kv_bytes / ms / 1e6

            print(f"{batch:>5} {ctx:>5} {splits:>6} | {t_tri:>9.4f} {bw(t_tri):>6.0f} | {t_one:>9.4f} {bw(t_one):>6.0f} |"
                  f" {t_ref:>9.4f} {bw(t_ref):>6.0f} | {t_ref / t_tri:>6.1f}x")


def bench_prefill(runs: int, flush: torch.Tensor) -> None:
    from tests.gpu.test_kernels_triton import make_step
    from tokenq_kernels.attention import paged_attention_ref
    from tokenq_kernels.attention_triton import paged_attention_triton

    print("\nprefill attention (causal), same layer shape")
    print(f"{'seqs x new (cached)':>22} | {'triton ms':>9} {'TFLOP/s':>8} | {'torch ms':>9} {'TFLOP/s':>8}")
    scale = D**-0.5
    for n, new, cached in [(1, 2048, 0), (4, 1024, 0), (2, 512, 3000)]:
        k_cache, v_cache, meta = make_step([new] * n, [new + cached] * n, HKV, D, BLOCK, DTYPE, "cuda")
        q = torch.randn(n * new, HQ, D, dtype=DTYPE, device="cuda")
        # q.k and p.v over the visible (causal) pairs: 4 * D flops each
        flops = 4 * D * HQ * n * sum(cached + j + 1 for j in range(new))
        args = (q, k_cache, v_cache, meta, scale)
        t_tri = timeit(partial(paged_attention_triton, *args), runs, flush)
        t_ref = timeit(partial(paged_attention_ref, *args), max(5, runs // 4), flush)
        label = f"{n} x {new} ({cached})"
        print(f"{label:>22} | {t_tri:>9.4f} {flops / t_tri / 1e9:>8.1f} | {t_ref:>9.4f} {flops / t_ref / 1e9:>8.1f}")


def bench_small(runs: int, flush: torch.Tensor) -> None:
    from tokenq_kernels.activation import silu_and_mul_ref
    from tokenq_kernels.activation_triton import silu_and_mul_triton
    from tokenq_kernels.kv_cache import store_kv_ref
    from tokenq_kernels.kv_cache_triton import store_kv_triton
    from tokenq_kernels.norm import fused_add_rms_norm_ref
    from tokenq_kernels.norm_triton import fused_add_rms_norm_triton
    from tokenq_kernels.rotary import rotary_ref
    from tokenq_kernels.rotary_triton import rotary_triton
    from tokenq_kernels.sampling import GREEDY_BELOW, gumbel_argmax_ref, row_keys
    from tokenq_kernels.sampling_triton import gumbel_argmax_triton

    T, hidden, inter, vocab = 256, 4096, 14336, 128256
    x = torch.randn(T, hidden, dtype=DTYPE, device="cuda")
    res = torch.randn_like(x)
    w = torch.rand(hidden, dtype=DTYPE, device="cuda") + 0.5
    gate_up = torch.randn(T, 2 * inter, dtype=DTYPE, device="cuda")
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, dtype=DTYPE, device="cuda")
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    pos = torch.randint(0, 8192, (T,), device="cuda")
    cos_sin = torch.randn(8192, D, dtype=DTYPE, device="cuda")
    kv = torch.zeros(2, 4096, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    slots = torch.randperm(4096 * BLOCK, device="cuda")[:T]
    k3, v3 = k.view(T, HKV, D), v.view(T, HKV, D)
    logits = torch.randn(T, vocab, device="cuda")
    temp = torch.rand(T, device="cuda") + 0.5
    greedy = temp < GREEDY_BELOW
    keys = row_keys(torch.randint(0, 2**62, (T,), device="cuda"), torch.zeros(T, dtype=torch.long, device="cuda"))
    cases = [
        ("fused_add_rms_norm", lambda: fused_add_rms_norm_triton(x, res, w, 1e-5),
         lambda: fused_add_rms_norm_ref(x, res, w, 1e-5)),
        ("silu_and_mul", lambda: silu_and_mul_triton(gate_up), lambda: silu_and_mul_ref(gate_up)),
        ("rotary (in place / copy)", lambda: rotary_triton(pos, q, k, cos_sin, D),
         lambda: rotary_ref(pos, q, k, cos_sin, D)),
        ("store_kv", lambda: store_kv_triton(k3, v3, kv[0], kv[1], slots),
         lambda: store_kv_ref(k3, v3, kv[0], kv[1], slots)),
        ("sampling (exp race)", lambda: gumbel_argmax_triton(logits, 1 / temp, greedy, keys),
         lambda: gumbel_argmax_ref(logits, 1 / temp, greedy, keys)),
    ]
    print(f"\nsmall kernels, {T} tokens (rows), hidden {hidden}, intermediate {inter}, vocab {vocab}")
    print(f"{'kernel':>26} | {'triton ms':>9} | {'torch ms':>9} | {'speedup':>7}")
    for name, tri, ref in cases:
        t_tri, t_ref = timeit(tri, runs, flush), timeit(ref, runs, flush)
        print(f"{name:>26} | {t_tri:>9.4f} | {t_ref:>9.4f} | {t_ref / t_tri:>6.1f}x")


def sweep_decode(runs: int, flush: torch.Tensor) -> None:
    from tokenq_kernels.attention_triton import launch_config, paged_attention_triton

    print("\nsweep: decode tile shapes (ms, median); the default is marked *")
    base = launch_config(1, HQ // HKV, DTYPE)
    shapes = [(bn, st, 4) for bn in (32, 64, 128) for st in (2, 3, 5)] + [(64, 3, 8), (128, 3, 8)]
    for batch, ctx in [(1, 4096), (32, 4096), (256, 4096), (32, 512)]:
        args = (*decode_step(batch, ctx), D**-0.5)
        split_options = [1] + [s for s in (2, 4, 8, 16, 32) if batch * HKV * s <= 8 * 132]
        best = (math.inf, None)
        for bn, st, nw in shapes:
            cfg = dataclasses.replace(base, block_n=bn, num_stages=st, num_warps=nw)
            for splits in split_options:
                try:
                    fn = partial(paged_attention_triton, *args, num_splits=splits, config=cfg)
                    ms = timeit(fn, max(5, runs // 4), flush)
                except Exception as e:  # out of shared memory or registers: not a candidate
                    print(f"  batch {batch} ctx {ctx} {cfg} splits {splits}: {type(e).__name__}")
                    continue
                best = min(best, (ms, (bn, st, nw, splits)), key=lambda b: b[0])
        ms_default = timeit(partial(paged_attention_triton, *args), runs, flush)
        kv_gb = 2 * batch * ctx * HKV * D * DTYPE.itemsize / 1e9
        print(f"  batch {batch:>3} ctx {ctx:>4}: default* {ms_default:.4f} ms ({kv_gb / ms_default * 1e3:.0f} GB/s); "
              f"best {best[0]:.4f} ms ({kv_gb / best[0] * 1e3:.0f} GB/s) with (BLOCK_N, stages, warps, splits)="
              f"{best[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    ok = True
    if not args.skip_checks:
        ok = run_correctness()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # larger than any L2
    bench_decode(args.runs, flush)
    bench_prefill(args.runs, flush)
    bench_small(args.runs, flush)
    if args.sweep:
        sweep_decode(args.runs, flush)
    print("\nALL CHECKS PASS" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
