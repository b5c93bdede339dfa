"""Which implementation a kernel runs: Triton for CUDA tensors when triton imports, else the torch reference.

Decided per call from the tensor's device, so CPU runs (laptops, CI without triton) never touch triton.
TOKENQ_KERNELS=torch forces the references everywhere, to bisect a suspected kernel bug.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = os.environ.get("TOKENQ_KERNELS", "").lower() != "torch"
except ImportError:
    HAS_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors, for grid heuristics; interpreter runs on a CPU pretend to be an H100."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    """Triton block shapes must be powers of two; masks cover the padding."""
    return 1 << max(0, n - 1).bit_length()
