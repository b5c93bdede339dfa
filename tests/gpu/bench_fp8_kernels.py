"""The FP8 per-layer kernels of a decode step at Llama-3-8B's sizes, checked against their references, then
timed (CUDA events, median of many, L2 flushed before each):

    python tests/gpu/bench_fp8_kernels.py

1. SiLU-and-multiply quantized per row (one pass over a whole row) against the plain 16-bit SiLU and
   against the plain SiLU followed by the row quantizer, at 1 to 2,048 rows of 14,336.
2. Decode attention over an FP8 cache (the default tiles and a sweep of key tile, stages and warps)
   against the same kernel over the bf16 cache the FP8 one was quantized from, at the batch sizes and
   contexts of the standard load (512 sequences of about 420 tokens at its peak) and a few others.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu.bench_kernels import timeit as _timeit  # noqa: E402
from tests.gpu.test_kernels_triton import make_step  # noqa: E402
from tokenq_kernels.activation_triton import silu_and_mul_triton  # noqa: E402
from tokenq_kernels.attention import paged_attention_ref  # noqa: E402
from tokenq_kernels.attention_triton import launch_config, paged_attention_triton  # noqa: E402
from tokenq_kernels.fp8 import FP8, FP8_MAX, silu_and_mul_quant_ref  # noqa: E402
from tokenq_kernels.fp8_triton import quantize_rows_triton, silu_and_mul_quant_triton  # noqa: E402
from tokenq_kernels.kv_cache import to_cache_dtype  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16
INTERMEDIATE = 14336
RUNS = 100
TILES = [(32, 3, 1), (32, 4, 1), (32, 3, 2), (32, 4, 2), (64, 3, 2), (64, 4, 2), (64, 3, 4), (128, 3, 4)]


def bench_silu(flush: torch.Tensor) -> None:
    print(f"\nSiLU-and-mul + FP8 row quantization, intermediate {INTERMEDIATE} (ms)")
    print(f"{'rows':>5} | {'fused':>7} {'codes':>6} | {'plain SiLU':>10} | {'SiLU, then quantize':>19}")
    for rows in (1, 16, 256, 512, 2048):
        x = torch.randn(rows, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
        got, want = silu_and_mul_quant_triton(x), silu_and_mul_quant_ref(x)
        same = torch.equal(got.scale, want.scale) and (got.q.float() != want.q.float()).float().mean().item() < 1e-3
        fused = _timeit(lambda x=x: silu_and_mul_quant_triton(x), RUNS, flush)
        plain = _timeit(lambda x=x: silu_and_mul_triton(x), RUNS, flush)
        two = _timeit(lambda x=x: quantize_rows_triton(silu_and_mul_triton(x)), RUNS, flush)
        print(f"{rows:>5} | {fused:>7.4f} {'same' if same else 'DIFFER':>6} | {plain:>10.4f} | {two:>19.4f}")


def fp8_step(batch: int, ctx: int | list[int]):
    """A decode step over a bf16 cache and the same cache quantized to e4m3 with one scale each for K, V; ctx is
    every sequence's context, or each one's."""
    lengths = [ctx] * batch if isinstance(ctx, int) else ctx
    k_cache, v_cache, meta = make_step([1] * batch, lengths, HKV, D, BLOCK, torch.bfloat16, "cuda")
    ks = (k_cache.float().abs().amax() / FP8_MAX).reshape(1)
    vs = (v_cache.float().abs().amax() / FP8_MAX).reshape(1)
    k8, v8 = to_cache_dtype(k_cache, FP8, ks), to_cache_dtype(v_cache, FP8, vs)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    return q, (k_cache, v_cache), (k8, v8, ks, vs), meta


def bench_attention(flush: torch.Tensor) -> None:
    default = launch_config(1, HQ // HKV, torch.bfloat16, kv_fp8=True)
    print(f"\ndecode attention, Llama-3-8B layer (Hq={HQ}, Hkv={HKV}, D={D}, block {BLOCK}), bf16 q (ms); "
          f"FP8 default tiles (BLOCK_N, stages, warps) = {(default.block_n, default.num_stages, default.num_warps)}")
    for batch, ctx in [(512, 420), (256, 160), (256, 512), (64, 1024), (8, 2048), (1, 512)]:
        print(attention_row(batch, ctx, default, flush))


def attention_row(batch: int, ctx: int, default, flush: torch.Tensor) -> str:
    scale = D**-0.5
    q, (kb, vb), (k8, v8, ks, vs), meta = fp8_step(batch, ctx)
    fp8 = partial(paged_attention_triton, q, k8, v8, meta, scale, k_scale=ks, v_scale=vs)
    ref = paged_attention_ref(q, k8, v8, meta, scale, k_scale=ks, v_scale=vs)
    err = ((fp8().float() - ref.float()).norm() / ref.float().norm()).item()
    t_bf16 = _timeit(partial(paged_attention_triton, q, kb, vb, meta, scale), RUNS, flush)
    t_fp8 = _timeit(fp8, RUNS, flush)
    sweep, sweep_bf16 = [], []
    bf16 = partial(paged_attention_triton, q, kb, vb, meta, scale)
    for bn, st, nw in TILES:
        cfg = dataclasses.replace(default, block_n=bn, num_stages=st, num_warps=nw)
        sweep.append(f"{bn},{st},{nw}: {_timeit(partial(fp8, config=cfg), RUNS, flush):.4f}")
        sweep_bf16.append(f"{bn},{st},{nw}: {_timeit(partial(bf16, config=cfg), RUNS, flush):.4f}")
    gb = 2 * batch * ctx * HKV * D / 1e9
    return (f"batch {batch:>3} ctx {ctx:>4}: bf16 cache {t_bf16:.4f} ({2 * gb / t_bf16 * 1e3:.0f} GB/s) | FP8 "
            f"{t_fp8:.4f} ({gb / t_fp8 * 1e3:.0f} GB/s, {t_bf16 / t_fp8:.2f}x bf16, rel. err {err:.1e})\n"
            f"    FP8 sweep (BLOCK_N, stages, warps) {'; '.join(sweep)}\n    bf16 sweep {'; '.join(sweep_bf16)}")


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    bench_silu(flush)
    bench_attention(flush)
    return 0


if __name__ == "__main__":
    sys.exit(main())
