"""Does the order of a decode batch's sequences matter to attention over an FP8 cache? The standard load's
contexts vary (prompts of 64-512 tokens plus what each has generated), so a grid in arrival order can end on
a few long sequences while most SMs idle. Times the shipped kernel on one batch of varied lengths in
arrival (random) order, longest first, and shortest first, against the same keys at one uniform length:

    python tests/gpu/explore_decode_order.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu.bench_fp8_kernels import HKV, D, fp8_step  # noqa: E402
from tests.gpu.bench_kernels import timeit  # noqa: E402
from tokenq_kernels.attention import paged_attention_ref  # noqa: E402
from tokenq_kernels.attention_triton import paged_attention_triton  # noqa: E402


def main() -> int:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    gen = torch.Generator().manual_seed(0)
    for generated in (0, 128, 255):
        prompts = torch.randint(64, 513, (512,), generator=gen).tolist()
        arrival = [p + generated for p in prompts]
        mean = round(sum(arrival) / len(arrival))
        orders = {"arrival order": arrival, "longest first": sorted(arrival, reverse=True),
                  "shortest first": sorted(arrival), f"uniform {mean}": [mean] * len(arrival)}
        gb = 2 * sum(arrival) * HKV * D / 1e9
        print(f"\n512 sequences, {generated} generated (contexts {min(arrival)}-{max(arrival)}, mean {mean}): "
              f"{gb * 1e3:.0f} MB of keys and values")
        base = None
        for name, lengths in orders.items():
            q, _, (k8, v8, ks, vs), meta = fp8_step(len(lengths), lengths)
            ref = paged_attention_ref(q, k8, v8, meta, D**-0.5, k_scale=ks, v_scale=vs).float()
            for splits in (None, 2):
                fn = partial(paged_attention_triton, q, k8, v8, meta, D**-0.5, num_splits=splits, k_scale=ks,
                             v_scale=vs)
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                t = timeit(fn, 100, flush)
                base = base or t
                print(f"  {name:16s} splits {splits or 1}: {t:.4f} ms {gb / t * 1e3:6.0f} GB/s  "
                      f"{base / t:5.2f}x  err {err:.1e}")
            del q, k8, v8, meta
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
