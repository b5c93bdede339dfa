"""Does the block-table lookup limit decode attention over an FP8 cache? The shipped decode layout (scores
transposed, fp8 widened to float16) with three ways to find a key tile's cache blocks, timed against the
product kernel at the standard load's shapes:

    python tests/gpu/explore_attention_addressing.py

addr 0: the block ids of each tile loaded at the top of its iteration (as shipped);
addr 1: the next tile's block ids loaded one iteration ahead;
addr 2: no table at all, each sequence's blocks consecutive (timing only: it reads other blocks, so its
        output is not checked): how fast the kernel is when the lookup costs nothing.
"""

from __future__ import annotations

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
from tokenq_kernels.attention_triton import paged_attention_triton  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, sl_ptr, ks_ptr, vs_ptr, qk_scale, num_blocks,
            stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            stride_ot, stride_oh, stride_bt, max_blocks,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            CACHE_BLOCK: tl.constexpr, ADDR: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    head = kvh * GROUP + rows
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=(rows < GROUP)[:, None], other=0.0)
    qT = tl.trans(tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16))
    qk_scale = qk_scale * tl.load(ks_ptr)
    keys = tl.arange(0, BLOCK_N)
    table = bt_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([1, BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([1, BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    nxt = tl.load(table + keys // CACHE_BLOCK, mask=keys < seq_len, other=0).to(tl.int64)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + keys
        key_ok = pos < seq_len
        if ADDR == 0:
            block = tl.load(table + pos // CACHE_BLOCK, mask=key_ok, other=0).to(tl.int64)
        elif ADDR == 1:
            block = nxt
            ahead = pos + BLOCK_N
            nxt = tl.load(table + ahead // CACHE_BLOCK, mask=ahead < seq_len, other=0).to(tl.int64)
        else:
            block = ((seq * max_blocks + pos // CACHE_BLOCK) % num_blocks).to(tl.int64)
        slot = pos % CACHE_BLOCK
        k = tl.load(k_ptr + (block * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (block * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None] + dims[None, :],
                    mask=key_ok[:, None], other=0.0)
        s = tl.dot(k.to(tl.float16), qT) * qk_scale
        s = tl.where(key_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0)[None, :])
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)[None, :]
        acc = acc * tl.trans(alpha) + tl.dot(tl.trans(p.to(tl.float16)), v.to(tl.float16))
        m_i = m_new
    ln = tl.trans(l_i)
    out = acc / tl.where(ln > 0, ln, 1.0) * tl.load(vs_ptr)
    o = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])


def variant(q, k8, v8, meta, scale, ks, vs, addr, block_n, warps, stages):
    out = torch.empty_like(q)
    _kernel[(q.shape[0], k8.shape[2])](
        q, k8, v8, out, meta.block_tables, meta.seq_lens, ks, vs, scale * _LOG2E, k8.shape[0],
        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2),
        v8.stride(0), v8.stride(1), v8.stride(2), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        meta.block_tables.shape[1], GROUP=HQ // HKV, BLOCK_M=16, D=D, BLOCK_N=block_n, CACHE_BLOCK=k8.shape[1],
        ADDR=addr, num_warps=warps, num_stages=stages)
    return out


def main() -> int:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    scale = D**-0.5
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    for batch, ctx in [(512, 420), (256, 512), (64, 1024)]:
        q, _, (k8, v8, ks, vs), meta = fp8_step(batch, ctx)
        ref = paged_attention_ref(q, k8, v8, meta, scale, k_scale=ks, v_scale=vs).float()
        gb = 2 * batch * ctx * HKV * D / 1e9
        product = partial(paged_attention_triton, q, k8, v8, meta, scale, k_scale=ks, v_scale=vs)
        rows = [("product", timeit(product, 100, flush), 0.0)]
        for addr in (0, 1, 2):
            for block_n, warps, stages in [(64, 2, 3), (64, 2, 4), (32, 1, 4), (128, 4, 3)]:
                fn = partial(variant, q, k8, v8, meta, scale, ks, vs, addr, block_n, warps, stages)
                err = ((fn().float() - ref).norm() / ref.norm()).item() if addr < 2 else float("nan")
                rows.append((f"addr {addr} tiles {block_n},{warps}w,{stages}s", timeit(fn, 100, flush), err))
        print(f"\nbatch {batch} ctx {ctx}: {gb * 1e3:.0f} MB of keys and values")
        for name, t, err in sorted(rows, key=lambda r: r[1]):
            print(f"  {name:30s} {t:.4f} ms {gb / t * 1e3:6.0f} GB/s  {rows[0][1] / t:5.2f}x  err {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
