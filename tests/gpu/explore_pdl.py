"""Programmatic dependent launch (PDL) for the batch-1 FP8 GEMVs: one decode step's 128 GEMVs (32 layers of
qkv, o, gate_up, down, each its own weight) in one CUDA graph, launched as shipped, with PDL (each kernel lets
the next launch at its start and waits for it before reading), and with PDL plus the first weight tile loaded
before the wait (weights never depend on the kernel before):

    python tests/gpu/explore_pdl.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu.bench_gemv import SHAPES, rel_err, time_graph  # noqa: E402
from tokenq_kernels.fp8 import QuantizedInput, fp8_gemv_ref, quantize_rows_ref  # noqa: E402
from tokenq_kernels.fp8_triton import _CODE_SCALE, _GROUP, fp8_gemv_tiles, fp8_gemv_triton  # noqa: E402


@triton.jit
def _gemv(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          GROUP: tl.constexpr, PREFETCH: tl.constexpr):
    gdc_launch_dependents()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    start = 0
    if PREFETCH:
        w0 = tl.load(w_ptrs)
        gdc_wait()
        x = (tl.load(x_ptr + offs_k).to(tl.float16) * _CODE_SCALE).to(tl.float16)
        p = w0.to(tl.float16) * x[None, :]
        acc += tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2).to(tl.float32)
        w_ptrs += BLOCK_K
        start = BLOCK_K
    else:
        gdc_wait()
    for k in range(start, K, BLOCK_K):
        w = tl.load(w_ptrs)
        x = (tl.load(x_ptr + k + offs_k).to(tl.float16) * _CODE_SCALE).to(tl.float16)
        p = w.to(tl.float16) * x[None, :]
        acc += tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2).to(tl.float32)
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * (tl.load(ws_ptr + offs_n) * tl.load(xs_ptr) / _CODE_SCALE)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


def gemv_pdl(x: QuantizedInput, w: torch.Tensor, ws: torch.Tensor, y: torch.Tensor, prefetch: bool) -> None:
    n, k = w.shape
    cfg = fp8_gemv_tiles(n, k, True)
    _gemv[(n // cfg.block_n,)](x.q, x.scale, w, ws, y, k, w.stride(0), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               GROUP=_GROUP, PREFETCH=prefetch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                               launch_pdl=True)


def main() -> int:
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    layers = []
    for _ in range(32):
        layer = []
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            n, k, _ = SHAPES[name]
            w, ws = quantize_rows_ref(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            layer.append((w, ws.reshape(-1), torch.empty(1, n, device="cuda", dtype=torch.bfloat16)))
        layers.append(layer)
    xs = {k: QuantizedInput(*quantize_rows_ref(torch.randn(1, k, device="cuda", dtype=torch.bfloat16)), torch.bfloat16)
          for k in (4096, 14336)}
    nbytes = sum(w.numel() for layer in layers for w, _, _ in layer)

    entries = [entry for layer in layers for entry in layer]

    def launch(kind: str, entry) -> None:
        w, ws, y = entry
        if kind == "shipped":
            fp8_gemv_triton(xs[w.shape[1]], w, ws, None)
        else:
            gemv_pdl(xs[w.shape[1]], w, ws, y, kind == "pdl+prefetch")

    w, ws, y = layers[3][2]
    for kind in ("shipped", "pdl", "pdl+prefetch", "shipped"):
        err = 0.0
        if kind != "shipped":
            launch(kind, (w, ws, y))
            err = rel_err(y, fp8_gemv_ref(xs[4096], w, ws, None).float())
        ms = time_graph(lambda _, entry, kind=kind: launch(kind, entry), entries, None) * len(entries) / 1e3
        print(f"{kind:14s} {ms:.3f} ms for {len(entries)} GEMVs ({nbytes / ms / 1e9:.2f} TB/s)  rel err {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
