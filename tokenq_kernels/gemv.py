"""Linear layers at small batch: our Triton GEMV where it beats cuBLAS, oneDNN's matmul on a CPU (but for
one row of a small weight), F.linear everywhere else.

The reference is F.linear itself. Which shapes go to Triton, and with which tiles, comes from
`tests/gpu/bench_gemv.py` on an H200 (docs/BENCHMARKS.md); the engine turns the kernel off from its config
(TOKENQ_GEMV=cublas), the benches from their --gemv flag.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenq_kernels.dispatch import HAS_TRITON, use_triton


class GemvConfig(NamedTuple):
    """Tiles of one launch: BLOCK_N output features x BLOCK_K of the reduction per program."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


ENABLED = True
MAX_ROWS = 1  # rows of x up to which the Triton kernel may run
# On a CPU, float32 products of several rows (a decode batch, a prefill chunk), and any product with a weight
# of at least this many elements (an LM head), go to oneDNN's matmul, which runs them faster than MKL's sgemm
# behind F.linear; one row of a decoder layer's weight stays on F.linear, which is as fast there
# (docs/BENCHMARKS.md). oneDNN sums in another order, so results differ from F.linear's in the last bits.
CPU_ONEDNN_MIN_WEIGHT = 1 << 24
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_onednn_linear = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None
# A float32 weight reordered once into oneDNN's blocked layout (pack_cpu_weight) spares each product the
# reorder that a plain weight costs it; laid out for products of this many rows (a decode batch), it serves
# every row count (docs/BENCHMARKS.md).
CPU_PACK_ROWS = 32
_ONEDNN_PACK = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def set_gemv_enabled(enabled: bool) -> None:
    """Our GEMV on (default) or off (cuBLAS) for this process: the engine's config, the benches' --gemv flag."""
    global ENABLED
    ENABLED = enabled


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def gemv_config(rows: int, n: int, k: int) -> GemvConfig | None:
    """Tiles for a [rows, k] x [n, k]^T product, or None where cuBLAS is the better choice.

    From the sweeps of tests/gpu/bench_gemv.py (docs/BENCHMARKS.md): one row only (at 2 to 8 rows the best
    tiles matched cuBLAS at best, and fell far behind it at 8); under PDL, 4 output features and 2,048 of K a
    program at every Llama-3-8B shape, about as fast as each shape's best. Small products stay on cuBLAS:
    nothing was measured there.
    """
    if rows > MAX_ROWS or n * k < 1 << 22:
        return None
    return GemvConfig(block_n=4, block_k=min(2048, 1 << (k - 1).bit_length()), num_stages=1)


def cpu_packable(weight: torch.Tensor) -> bool:
    """Whether pack_cpu_weight makes a copy of this weight: float32, 2-D, on a CPU whose torch has oneDNN."""
    return _ONEDNN_PACK and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def pack_cpu_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a float32 CPU weight, for linear(..., packed=); None where there is none to make.
    The copy does not follow later writes to the weight: make it once the weight is loaded."""
    if not cpu_packable(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), CPU_PACK_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; `packed` is pack_cpu_weight(weight), used for float32 products on a CPU."""
    if packed is not None and x.dtype == torch.float32 and x.dim() == 2 and len(x) and not torch.is_grad_enabled():
        return _onednn_linear(x, packed, bias, "none", [], "")
    if ENABLED and use_triton(x) and x.dtype == weight.dtype:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        cfg = gemv_config(rows, weight.shape[0], weight.shape[1])
        if cfg is not None:
            return gemv_triton(x, weight, bias, cfg)
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (x.numel() > x.shape[-1] or weight.numel() >= CPU_ONEDNN_MIN_WEIGHT)
            and not torch.is_grad_enabled()):
        return _onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


if HAS_TRITON:  # after GemvConfig, which the kernel module imports from here
    from tokenq_kernels.gemv_triton import gemv_triton
