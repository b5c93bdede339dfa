"""Variants of decode attention over an FP8 cache, checked against the reference and timed against the
product kernel (FP8 and bf16 caches), at the standard load's peak (512 sequences x 420 tokens):

    python tests/gpu/explore_fp8_attention.py [--ncu-target fp8|bf16|swap]

A variant changes one thing at a time: which operand of the QK and PV products the cache tile is (swap:
the key tile as the left operand, the one the tensor cores read from registers), how e4m3 widens (the
conversion instruction, or integer bit moves that give the value / 256), the tiles, and q quantized to e4m3
per head so the stored key tile enters an FP8 product unwidened (its accuracy shows in rel.err).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu.bench_fp8_kernels import HKV, HQ, D, fp8_step  # noqa: E402
from tests.gpu.bench_kernels import timeit  # noqa: E402
from tokenq_kernels.attention import paged_attention_ref  # noqa: E402
from tokenq_kernels.attention_triton import launch_config, paged_attention_triton  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _widen(x, BITS: tl.constexpr):
    if BITS:  # e4m3 bits moved into float16's fields: the value / 256
        b = x.to(tl.uint8, bitcast=True).to(tl.uint16)
        return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return x.to(tl.float16)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, sl_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, SWAP_QK: tl.constexpr, SWAP_PV: tl.constexpr, BITS: tl.constexpr,
    QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    qk_scale = qk_scale * tl.load(ks_ptr)
    out_scale = tl.load(vs_ptr)
    if BITS:
        qk_scale = qk_scale * 256.0
        out_scale = out_scale * 256.0
    qT = tl.trans(q)
    if QK_FP8:  # q quantized per head: the key tile enters the product as it is stored (transposed scores only)
        q_amax = tl.max(tl.abs(q.to(tl.float32)), 1)
        q_s = tl.where(q_amax > 0, q_amax / 448.0, 1.0)
        q8_t = tl.trans((q.to(tl.float32) / q_s[:, None]).to(tl.float8e4nv))
        qk_scale_t = qk_scale * q_s[None, :]
    keys = tl.arange(0, BLOCK_N)
    table = bt_ptr + seq.to(tl.int64) * stride_bt
    if SWAP_QK:
        m_i = tl.full([1, BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([1, BLOCK_M], tl.float32)
    else:
        m_i = tl.full([BLOCK_M, 1], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    if SWAP_PV:
        acc = tl.zeros([D, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + keys
        key_ok = pos < seq_len
        block = tl.load(table + pos // CACHE_BLOCK, mask=key_ok, other=0).to(tl.int64)
        slot = pos % CACHE_BLOCK
        k = tl.load(k_ptr + (block * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        if SWAP_QK:  # scores transposed: [BLOCK_N, BLOCK_M]
            if QK_FP8:
                s = tl.dot(k, q8_t) * qk_scale_t
            else:
                s = tl.dot(_widen(k, BITS), qT) * qk_scale
            s = tl.where(key_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0)[None, :])
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)[None, :]
        else:
            s = tl.dot(q, tl.trans(_widen(k, BITS))) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1)[:, None])
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)[:, None]
        v = tl.load(v_ptr + (block * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None] + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        if PV_FP8:  # p x 256 in e4m3 against the stored value tile (transposed scores only)
            acc = acc * tl.trans(alpha) + tl.dot(tl.trans((p * 256.0).to(tl.float8e4nv)), v)
        else:
            v = _widen(v, BITS)
            p16 = p.to(tl.float16)
            if SWAP_PV:  # acc transposed: [D, BLOCK_M]
                pT = p16 if SWAP_QK else tl.trans(p16)
                aT = alpha if SWAP_QK else tl.trans(alpha)
                acc = acc * aT + tl.dot(tl.trans(v), pT)
            else:
                pn = tl.trans(p16) if SWAP_QK else p16
                an = tl.trans(alpha) if SWAP_QK else alpha
                acc = acc * an + tl.dot(pn, v)
        m_i = m_new
    if PV_FP8:
        out_scale = out_scale / 256.0
    if SWAP_PV:
        lT = tl.trans(l_i) if not SWAP_QK else l_i
        out = tl.trans(acc / tl.where(lT > 0, lT, 1.0)) * out_scale
    else:
        ln = tl.trans(l_i) if SWAP_QK else l_i
        out = acc / tl.where(ln > 0, ln, 1.0) * out_scale
    o = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def decode_variant(q, k8, v8, meta, scale, ks, vs, swap_qk, swap_pv, bits, block_n, warps, stages, qk_fp8=False,
                   pv_fp8=False):
    T, hq, d = q.shape
    cache_block, hkv = k8.shape[1], k8.shape[2]
    out = torch.empty_like(q)
    _decode_kernel[(T, hkv)](
        q, k8, v8, out, meta.block_tables, meta.seq_lens, ks, vs, scale * _LOG2E,
        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2),
        v8.stride(0), v8.stride(1), v8.stride(2), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        GROUP=hq // hkv, BLOCK_M=16, D=d, BLOCK_N=block_n, CACHE_BLOCK=cache_block,
        SWAP_QK=swap_qk, SWAP_PV=swap_pv, BITS=bits, QK_FP8=qk_fp8, PV_FP8=pv_fp8, num_warps=warps, num_stages=stages,
    )
    return out


def variants(fp8_products_only: bool = False):
    for block_n, warps, stages in [(64, 2, 3), (32, 1, 3), (64, 4, 3), (128, 4, 3), (64, 2, 4), (128, 2, 3)]:
        yield True, False, False, block_n, warps, stages, True, False  # FP8 q @ the stored keys
        yield True, False, False, block_n, warps, stages, True, True  # and FP8 p @ the stored values
        yield True, False, False, block_n, warps, stages, False, True
    yield True, False, False, 64, 2, 3, False, False  # the shipped decode kernel's shape
    if fp8_products_only:
        return
    for swap_qk in (False, True):
        for swap_pv in (False, True):
            for bits in (False, True):
                for block_n, warps, stages in [(64, 2, 3), (64, 4, 3), (128, 4, 3), (32, 1, 4), (64, 1, 3),
                                               (128, 4, 2), (64, 2, 4)]:
                    yield swap_qk, swap_pv, bits, block_n, warps, stages, False, False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu-target", choices=["fp8", "bf16", "swap"], default=None)
    ap.add_argument("--shapes", default="512x420,256x512,64x1024")
    ap.add_argument("--fp8-products-only", action="store_true", help="only the variants with FP8 products")
    args = ap.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    scale = D**-0.5
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ncu_target:
        q, (kb, vb), (k8, v8, ks, vs), meta = fp8_step(*shapes[0])
        for _ in range(3):
            if args.ncu_target == "fp8":
                paged_attention_triton(q, k8, v8, meta, scale, k_scale=ks, v_scale=vs)
            elif args.ncu_target == "bf16":
                paged_attention_triton(q, kb, vb, meta, scale)
            else:
                decode_variant(q, k8, v8, meta, scale, ks, vs, True, False, False, 64, 2, 3)
        torch.cuda.synchronize()
        return 0
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "default",
          launch_config(1, HQ // HKV, torch.bfloat16, kv_fp8=True))
    for batch, ctx in shapes:
        q, (kb, vb), (k8, v8, ks, vs), meta = fp8_step(batch, ctx)
        ref = paged_attention_ref(q, k8, v8, meta, scale, k_scale=ks, v_scale=vs).float()
        gb = 2 * batch * ctx * HKV * D / 1e9
        t_bf16 = timeit(partial(paged_attention_triton, q, kb, vb, meta, scale), 100, flush)
        t_fp8 = timeit(partial(paged_attention_triton, q, k8, v8, meta, scale, k_scale=ks, v_scale=vs), 100, flush)
        print(f"\nbatch {batch} ctx {ctx}: product bf16 cache {t_bf16:.4f} ms ({2 * gb / t_bf16 * 1e3:.0f} GB/s), "
              f"product FP8 {t_fp8:.4f} ms ({gb / t_fp8 * 1e3:.0f} GB/s)")
        rows = []
        for v in variants(args.fp8_products_only):
            try:
                fn = partial(decode_variant, q, k8, v8, meta, scale, ks, vs, *v)
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                t = timeit(fn, 100, flush) if err < 0.1 else float("nan")  # q in e4m3 (qk_fp8) errs ~3e-2
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                err, t = float("nan"), float("nan")
                print("  failed", v, type(exc).__name__, str(exc).splitlines()[0][:120])
            rows.append((t, v, err))
        rows.sort(key=lambda r: (r[0] != r[0], r[0]))
        print("  swap_qk swap_pv bits  block_n warps stages qk_fp8 pv_fp8 |   ms    GB/s  vs FP8 product  rel.err")
        for t, v, err in rows:
            print(f"  {v[0]!s:>7} {v[1]!s:>7} {v[2]!s:>5} {v[3]:>8} {v[4]:>5} {v[5]:>6} {v[6]!s:>6} {v[7]!s:>6} | {t:.4f} "
                  f"{gb / t * 1e3:>6.0f}  {t_fp8 / t:>6.2f}x  {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
