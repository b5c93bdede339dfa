"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts while the one before it still runs.

A decode step at batch 1 is some 350 short kernels, and each one's launch, ramp-up and first loads otherwise
wait for the last block of the one before to finish. Under PDL each of our kernels lets the next one launch at
its own start, and the next one waits for it before it reads anything an earlier kernel may write
(tokenq_kernels/pdl_triton.py). What no kernel of the step writes may be loaded before the wait: weights, and
the step's metadata (positions, slots, block tables), which the host copies in before the step's first kernel,
one of torch's, which starts only once they have landed.

One rule keeps chains of kernels correct: every program of a kernel launched with PDL waits before its first
load of such data, its first store, and any early return. A kernel then finishes only after the one before it
has finished, so waiting for the kernel just before covers all earlier ones. Kernels that know nothing of PDL
(torch's) are launched as usual and wait for everything before them, as always.
"""

from __future__ import annotations

import functools

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

    HAS_GDC = True  # this triton has the grid-dependency intrinsics
except ImportError:
    HAS_GDC = False

_enabled = True


def set_pdl_enabled(enabled: bool) -> None:
    """PDL on (default, where the GPU has it) or off for this process: the engine's config (TOKENQ_PDL=0)."""
    global _enabled
    _enabled = enabled


@functools.lru_cache(maxsize=8)
def _device_has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def use_pdl(x: torch.Tensor) -> bool:
    """Whether kernels on x's device launch with PDL (a compile-time flag of each kernel, and its launch's)."""
    return _enabled and HAS_GDC and x.is_cuda and _device_has_pdl(x.device)


def pdl_options(x: torch.Tensor) -> dict[str, bool]:
    """The PDL arguments of a launch on x's device: the kernel's PDL flag, and the launch keyword only when PDL
    is on (a triton without the intrinsics may not know it)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(x) else {"PDL": False}
