"""On a CPU, a float32 model's linear weights (its LM head too) are also kept in oneDNN's blocked layout, made
once after loading (tokenq_kernels.gemv.pack_cpu_weight): a plain weight costs each product a reorder, which at
a decode batch's size is about a third of the product (docs/BENCHMARKS.md). The copies cost the linear
weights' memory once more, so they are made only while those total at most PACK_BUDGET_BYTES."""

from __future__ import annotations

import torch

from tokenq_kernels.gemv import cpu_packable, pack_cpu_weight

PACK_BUDGET_BYTES = 2 << 30


def pack_cpu_weights(model: torch.nn.Module) -> int:
    """Packs the weight of every layer that takes one (`cpu_packed`) where it can be packed; returns the bytes
    packed (0 when none, or when they would pass the budget)."""
    layers = [m for m in model.modules() if hasattr(m, "cpu_packed") and cpu_packable(m.weight)]
    total = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if total > PACK_BUDGET_BYTES:
        return 0
    for m in layers:
        m.cpu_packed = pack_cpu_weight(m.weight)
    return total
