"""The Llama-3-8B decode matmuls at small batch: cuBLAS (F.linear) against our Triton GEMV, per tile shape.

    python tests/gpu/bench_gemv.py [--rows 1 2 4] [--out FILE.json] [--quick]
    python tests/gpu/bench_gemv.py --fp8 [--out FILE.json]   # e4m3 weights: torch._scaled_mm vs our FP8 GEMV
    python tests/gpu/bench_gemv.py --fp8 --fp8-x bf16         # ... with x in bfloat16, as down_proj takes it

With --fp8 the weights are e4m3 with a scale per output feature, x is one row quantized per token (as a
decode step at batch 1 feeds it), the peer is torch._scaled_mm and the LM head (16-bit) is left out.

Each variant runs inside a CUDA graph (as a decode step does) over enough distinct weight copies that
the weights never sit in L2, so a call reads its whole weight from HBM. Time per call is the median
of 20 replays (CUDA events) over the copies. Every Triton variant is first checked against F.linear on
fresh random inputs (bf16 relative error under 1e-2); a failing one is reported and not timed.
Prints, per shape and row count, cuBLAS, the default tiles of tokenq_kernels.gemv, and the best tiles found,
with the bandwidth each reaches, and the sum over one decode step (32 layers + LM head).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenq_kernels.fp8 import fp8_gemv_ref, quantize_rows, quantize_rows_ref, scaled_mm  # noqa: E402
from tokenq_kernels.fp8_triton import fp8_gemv_tiles, fp8_gemv_triton  # noqa: E402
from tokenq_kernels.gemv import GemvConfig, gemv_config  # noqa: E402
from tokenq_kernels.gemv_triton import gemv_triton  # noqa: E402

SHAPES = {  # name: (N, K, calls per decode step)
    "qkv_proj": (6144, 4096, 32),
    "o_proj": (4096, 4096, 32),
    "gate_up_proj": (28672, 4096, 32),
    "down_proj": (4096, 14336, 32),
    "lm_head": (128256, 4096, 1),
}
DTYPE = torch.bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def time_graph(fn, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Microseconds per call of fn(x, w), one call per weight copy, replayed in one CUDA graph."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times) * 1e3 / len(weights)


def gbs(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


def candidates(rows: int, quick: bool) -> list[GemvConfig]:
    block_ns = [2, 4, 8, 16] if rows == 1 else [2, 4, 8]
    block_ks = [512, 1024, 2048] if rows == 1 else [256, 512, 1024]
    warps = [4, 8]
    stages = [1, 3] if rows == 1 else [1]
    if quick:
        block_ns, block_ks, stages = [8, 16], [512], [2]
    return [GemvConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product(block_ns, block_ks, warps, stages)]


def fp8_candidates() -> list[GemvConfig]:
    return [GemvConfig(bn, bk, w, s) for bn, bk, w, s in
            itertools.product([2, 4, 8, 16], [1024, 2048, 4096], [4, 8], [1, 3])]


def fp8_problem(n: int, k: int, x_bf16: bool = False):
    """e4m3 weights [n, k] with row scales, in enough copies that they never sit in L2 together; one row x
    quantized per token (or left in bfloat16); and the reference product for the first copy."""
    from tokenq_kernels.fp8 import QuantizedInput

    weights = []
    for _ in range(max(2, math.ceil(600e6 / (n * k)))):
        w, ws = quantize_rows_ref(torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02)
        weights.append((w, ws.reshape(-1)))
    x = torch.randn(1, k, device="cuda", dtype=DTYPE)
    if not x_bf16:
        x = QuantizedInput(*quantize_rows_ref(x), DTYPE)
    return weights, x, fp8_gemv_ref(x, *weights[0], None).float()


def sweep_fp8(shapes: list[str], x_bf16: bool = False) -> dict:
    """One row against e4m3 weights: torch._scaled_mm, the default FP8 tiles and every candidate."""
    results, step = [], [0.0, 0.0, 0.0]
    for name in shapes:
        if name == "lm_head":
            continue
        n, k, per_step = SHAPES[name]
        nbytes = n * k
        weights, x, ref = fp8_problem(n, k, x_bf16)
        if x_bf16:  # the peer quantizes x itself, as fp8_linear does for _scaled_mm
            peer = time_graph(lambda x, w: scaled_mm(*quantize_rows(x), w[0], w[1], None, DTYPE), weights, x)
        else:
            peer = time_graph(lambda x, w: scaled_mm(x.q, x.scale.reshape(-1, 1), w[0], w[1], None, DTYPE), weights, x)
        default = fp8_gemv_tiles(n, k, f16_products=not x_bf16)
        row = {"shape": name, "n": n, "k": k, "rows": 1, "scaled_mm_us": peer, "variants": []}
        best = None
        for cfg in dict.fromkeys([default] + fp8_candidates()):
            try:
                err = rel_err(fp8_gemv_triton(x, *weights[0], None, cfg), ref)
                if err >= 1e-2:
                    row["variants"].append({"cfg": cfg._asdict(), "error": f"rel err {err:.3g}"})
                    continue
                us = time_graph(lambda x, w, cfg=cfg: fp8_gemv_triton(x, w[0], w[1], None, cfg), weights, x)
            except Exception as e:  # a config that does not compile is a result, not a crash
                row["variants"].append({"cfg": cfg._asdict(), "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            row["variants"].append({"cfg": cfg._asdict(), "us": us, "rel_err": err})
            if cfg == default:
                row["default_us"] = us
            if best is None or us < best[1]:
                best = (cfg, us)
        row["best"] = {"cfg": best[0]._asdict(), "us": best[1]} if best else None
        results.append(row)
        d = row.get("default_us", float("nan"))
        print(f"{name:13s} fp8: _scaled_mm {peer:7.1f} us {gbs(nbytes, peer):6.0f} GB/s | default {d:7.1f} us "
              f"{gbs(nbytes, d):6.0f} GB/s" + (f" | best {best[1]:7.1f} us {gbs(nbytes, best[1]):6.0f} GB/s "
                                               f"{tuple(best[0])}" if best else ""))
        step[0] += per_step * peer
        step[1] += per_step * d
        step[2] += per_step * min(peer, best[1] if best else peer)
        del weights
        torch.cuda.empty_cache()
    print(f"\none decode step's FP8 matmuls (32 layers), ms: _scaled_mm {step[0] / 1e3:.3f} | default tiles "
          f"{step[1] / 1e3:.3f} | best per shape {step[2] / 1e3:.3f}")
    return {"results": results, "step_ms": {"scaled_mm": step[0] / 1e3, "default": step[1] / 1e3,
                                            "best": step[2] / 1e3}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fp8", action="store_true", help="e4m3 weights: torch._scaled_mm vs the FP8 GEMV")
    p.add_argument("--fp8-x", choices=["fp8", "bf16"], default="fp8",
                   help="x quantized per token (float16 products) or in bfloat16 (float32 products)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.fp8:
        report = sweep_fp8(args.shapes, args.fp8_x == "bf16")
        if args.out:
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), **report}, indent=1))
        return
    results: list[dict] = []
    step = {}  # rows -> [cublas us, default us, best us] summed over one decode step
    for name in args.shapes:
        n, k, per_step = SHAPES[name]
        nbytes = n * k * 2
        copies = max(2, math.ceil(600e6 / nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02 for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            ref = F.linear(x.float(), weights[0].float())
            cublas = time_graph(lambda x, w: F.linear(x, w), weights, x)
            row = {"shape": name, "n": n, "k": k, "rows": rows, "cublas_us": cublas, "variants": []}
            default = gemv_config(rows, n, k)
            best = None
            for cfg in dict.fromkeys(candidates(rows, args.quick) + ([default] if default else [])):
                try:
                    err = rel_err(gemv_triton(x, weights[0], None, cfg), ref)
                    if err >= 1e-2:
                        print(f"  FAIL {name} rows={rows} {cfg}: rel err {err:.3g}")
                        row["variants"].append({"cfg": cfg._asdict(), "error": f"rel err {err:.3g}"})
                        continue
                    us = time_graph(lambda x, w, cfg=cfg: gemv_triton(x, w, None, cfg), weights, x)
                except Exception as e:  # a config that does not compile is a result, not a crash
                    row["variants"].append({"cfg": cfg._asdict(), "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                row["variants"].append({"cfg": cfg._asdict(), "us": us, "rel_err": err})
                if best is None or us < best[1]:
                    best = (cfg, us)
                if cfg == default:
                    row["default_us"] = us
            row["best"] = {"cfg": best[0]._asdict(), "us": best[1]} if best else None
            results.append(row)
            d = row.get("default_us")
            print(
                f"{name:13s} rows={rows}: cuBLAS {cublas:7.1f} us {gbs(nbytes, cublas):6.0f} GB/s | default "
                + (f"{d:7.1f} us {gbs(nbytes, d):6.0f} GB/s" if d else "   (cuBLAS)        ")
                + (f" | best {best[1]:7.1f} us {gbs(nbytes, best[1]):6.0f} GB/s {tuple(best[0])}" if best else "")
            )
            acc = step.setdefault(rows, [0.0, 0.0, 0.0])
            acc[0] += per_step * cublas
            acc[1] += per_step * (d if d else cublas)
            acc[2] += per_step * min(cublas, best[1] if best else cublas)
        del weights
        torch.cuda.empty_cache()
    print("\none decode step's matmuls (32 layers + LM head), ms:")
    for rows, (c, d, b) in step.items():
        print(f"  rows={rows}: cuBLAS {c / 1e3:.3f} | tokenq_kernels.gemv defaults {d / 1e3:.3f} | best per shape {b / 1e3:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results,
                                        "step_ms": {r: [v / 1e3 for v in s] for r, s in step.items()}}, indent=1))


if __name__ == "__main__":
    main()
