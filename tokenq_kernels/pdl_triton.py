"""The two PDL steps inside a kernel, each a no-op unless the kernel is compiled with PDL (tokenq_kernels/pdl.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from tokenq_kernels.pdl import HAS_GDC

if HAS_GDC:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Lets the next kernel in the stream launch now; its own wait still holds it until this one finishes."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Waits until the kernel before this one has finished and its writes are visible."""
    if PDL:
        gdc_wait()
