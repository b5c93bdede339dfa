"""Which implementation a kernel runs: Triton for CUDA tensors when triton imports, else the torch reference.

Decided per call from the tensor's device, so CPU runs (laptops, CI without triton) never touch triton.
The process that runs a model may turn Triton off (the references everywhere, to bisect a suspected kernel
bug): the engine does so from its config (TOKENQ_KERNELS=torch), once, before its model loads.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True  # the *_triton modules import
except ImportError:
    HAS_TRITON = False

_triton_on = HAS_TRITON


def set_triton_enabled(enabled: bool) -> None:
    """Triton kernels on (where triton imports) or off (torch references) for this process."""
    global _triton_on
    _triton_on = enabled and HAS_TRITON


def use_triton(x: torch.Tensor) -> bool:
    return _triton_on and x.is_cuda


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors, for grid heuristics; interpreter runs on a CPU pretend to be an H100."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    """Triton block shapes must be powers of two; masks cover the padding."""
    return 1 << max(0, n - 1).bit_length()
