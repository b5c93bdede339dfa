"""Triton paged attention: one launch for a flattened step of decodes and prefill chunks.

Grid: (query tiles, KV heads, splits). A program takes BLOCK_Q query tokens of one sequence times the
whole GQA group of one KV head, so each K/V tile is loaded once for all the query heads that share it.
Tiles are numbered per sequence from query_start_loc (tile_start(i) = query_start_loc[i] // BLOCK_Q + i),
which bounds their count by T // BLOCK_Q + num_seqs without reading anything back from the device; a
decode-only step (BLOCK_Q = 1) has exactly one tile per sequence. A decode-only step over an FP8 cache runs
a kernel of its own with the scores transposed (keys x heads), which an H200 runs faster there; over a
16-bit cache it ran slower than this layout (docs/BENCHMARKS.md).

Split-K: with few programs for the SMs and long contexts, each sequence's context is cut into num_splits
equal partitions (sized on the device from seq_lens, so the grid depends only on host values); each
writes a partial (max, sum, unnormalized output) and a second kernel merges them. num_splits is a runtime
argument, so graphs captured for different batch sizes share one compiled kernel.

An FP8 cache (KV_FP8) is widened on load; its key scale folds into the softmax scale and its value scale
multiplies the accumulated output once, at the end. Under a 16-bit q it is widened to float16 (KV_F16),
and q with it: e4m3 to float16 is one conversion instruction per pair of values, where bfloat16 takes a
longer path that left the kernel slower on an FP8 cache than on a bfloat16 one. float16 holds every e4m3
value and q's values exactly up to its range (q is clamped to it, which no model's queries reach).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import next_pow2, sm_count
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs

if TYPE_CHECKING:
    from tokenq_kernels.attention_metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
# A finite start for the running max: a row whose first tiles are all masked must not compute inf - inf.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose tiles include `tile`: the last i with tile_start(i) <= tile (binary search)."""
    lo = tile * 0  # a tensor even when the loop never runs (one sequence)
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(start <= tile, mid, lo)
        hi = tl.where(start <= tile, hi, mid)
    return lo


@triton.jit
def _partition(kv_end, seq_len, split, num_splits, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """The keys [lo, hi) this program reads: under split-K, its part of the context cut into num_splits equal,
    tile-aligned partitions; otherwise all of [0, kv_end)."""
    lo = 0
    hi = kv_end
    if SPLIT:
        part = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * part
        hi = tl.minimum(kv_end, lo + part)
    return lo, hi


@triton.jit
def _tile_blocks(table, start, keys, kv_hi, CACHE_BLOCK: tl.constexpr):
    """The paged cache's block id of each key position start + keys (0 past kv_hi)."""
    pos = start + keys
    return tl.load(table + pos // CACHE_BLOCK, mask=pos < kv_hi, other=0).to(tl.int64)


@triton.jit
def _cache_slots(table, start, keys, kv_hi, CACHE_BLOCK: tl.constexpr):
    """Key positions start + keys: which are below kv_hi, and each one's block id and slot in the paged cache."""
    pos = start + keys
    return pos, pos < kv_hi, _tile_blocks(table, start, keys, kv_hi, CACHE_BLOCK), pos % CACHE_BLOCK


@triton.jit
def _load_cache_tile(cache_ptr, block, slot, head, stride_b, stride_t, stride_h, dims, mask):
    """The [keys, BLOCK_D] tile of one KV head at (block, slot) of a cache laid out [blocks, slots, heads, D]."""
    rows = block * stride_b + slot * stride_t + head * stride_h
    return tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0)


# Launch integers that vary step to step are not specialized (on == 1, on divisibility by 16), so one
# compiled kernel serves every batch.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "num_splits", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, qsl_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_seqs, num_tokens, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    KV_F16: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if BLOCK_Q == 1:  # a decode-only step: tile i is sequence i, no search, no idle tiles
        seq = tile
        q_begin = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_begin
        q_off = 0
    else:
        seq = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q)
        q_begin = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_begin
        q_off = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if q_off >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # context before this step's queries

    # Row r of the tile is query token q_off + r // GROUP_P, query head kv_head * GROUP + r % GROUP_P.
    rows = tl.arange(0, BLOCK_M)
    tok = q_off + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_ok = (tok < q_len) & (rows % GROUP_P < GROUP) & (rows < BLOCK_Q * GROUP_P)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if KV_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    last_key = cached + tok  # causal: the last key position each row may see
    kv_end = tl.minimum(seq_len, cached + q_off + BLOCK_Q)
    kv_lo, kv_hi = _partition(kv_end, seq_len, split, num_splits, BLOCK_N, SPLIT)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    keys = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, key_ok, block, slot = _cache_slots(table, start, keys, kv_hi, CACHE_BLOCK)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = _load_cache_tile(k_cache_ptr, block, slot, kv_head, stride_kb, stride_kt, stride_kh, dims, kv_mask)
        if KV_FP8:
            k = k.to(q.dtype)  # float16 under KV_F16
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :] & (pos[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cache_tile(v_cache_ptr, block, slot, kv_head, stride_vb, stride_vt, stride_vh, dims, kv_mask)
        if KV_FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    store_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        # Partials: acc [num_splits, T, H, HEAD_DIM], (max, sum) [num_splits, T, H, 2], all float32.
        ml_rows = (split * num_tokens + q_begin + tok).to(tl.int64) * NUM_HEADS + head
        tl.store(part_acc_ptr + ml_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        tl.store(part_ml_ptr + ml_rows * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + ml_rows * 2 + 1, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # a context of no tokens (graph padding) gives zeros
        out = acc / l_safe[:, None]
        o_rows = (q_begin + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["num_tokens", "num_splits", "stride_bt"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, qsl_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_tokens, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_F16: tl.constexpr, PDL: tl.constexpr,
):
    """A decode-only step over an FP8 cache: program (sequence, KV head, split) takes the one query token's GQA
    group.

    Scores are computed transposed, keys x heads (k @ q^T), and the softmax runs down the key axis: the
    widened key tile is then the left operand of the product, the one the tensor cores read from registers.
    Over an FP8 cache this ran faster on an H200 than the general kernel's q @ k^T; over a bf16 cache, slower."""
    release_dependents(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The step's metadata and its first block ids come from the host, so they load before the wait (pdl.py).
    q_begin = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo, kv_hi = _partition(seq_len, seq_len, split, num_splits, BLOCK_N, SPLIT)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    keys = tl.arange(0, BLOCK_N)
    # Each tile's block ids are loaded one iteration ahead: the key and value addresses depend on them, and a
    # lookup in the tile's own turn puts the table's latency before every tile's loads.
    next_block = _tile_blocks(table, kv_lo, keys, kv_hi, CACHE_BLOCK)
    wait_for_inputs(PDL)
    if q_end == q_begin:
        return
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = q_begin.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    qk_scale = qk_scale * tl.load(k_scale_ptr)
    if KV_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    q_t = tl.trans(q)  # [BLOCK_D, BLOCK_M]

    m_i = tl.full([1, BLOCK_M], _NEG_BIG, tl.float32)  # per head, along the key axis
    l_i = tl.zeros([1, BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + keys
        key_ok = pos < kv_hi
        block, slot = next_block, pos % CACHE_BLOCK
        next_block = _tile_blocks(table, start + BLOCK_N, keys, kv_hi, CACHE_BLOCK)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = _load_cache_tile(k_cache_ptr, block, slot, kv_head, stride_kb, stride_kt, stride_kh, dims, kv_mask)
        k = k.to(q.dtype)  # float16 under KV_F16
        s = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        s = tl.where(key_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0)[None, :])
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)[None, :]
        v = _load_cache_tile(v_cache_ptr, block, slot, kv_head, stride_vb, stride_vt, stride_vh, dims, kv_mask)
        v = v.to(q.dtype)
        acc = acc * tl.trans(alpha) + tl.dot(tl.trans(p.to(v.dtype)), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc * tl.load(v_scale_ptr)
    store_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        ml_rows = (split * num_tokens + q_begin).to(tl.int64) * NUM_HEADS + head
        tl.store(part_acc_ptr + ml_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        tl.store(part_ml_ptr + ml_rows * 2, tl.max(m_i, 0), mask=row_ok)
        tl.store(part_ml_ptr + ml_rows * 2 + 1, tl.sum(l_i, 0), mask=row_ok)
    else:
        l_t = tl.trans(l_i)
        out = acc / tl.where(l_t > 0, l_t, 1.0)  # a context of no tokens (graph padding) gives zeros
        o_rows = q_begin.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_tokens, num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_P: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (token, head): rescale every partition to the common max and normalize once."""
    release_dependents(PDL)
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    split_ok = splits < num_splits
    rows = (splits * num_tokens + t).to(tl.int64) * NUM_HEADS + h
    m = tl.load(part_ml_ptr + rows * 2, mask=split_ok, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + rows * 2 + 1, mask=split_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(l_part * w, 0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o = t.to(tl.int64) * stride_ot + h * stride_oh + dims
    tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@dataclass(frozen=True)
class LaunchConfig:
    block_q: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_block_n: int | None = None  # the key tile under split-K, where it differs from block_n

    @property
    def split_keys(self) -> int:
        return self.split_block_n or self.block_n


def launch_config(max_query_len: int, group: int, dtype: torch.dtype, kv_fp8: bool = False) -> LaunchConfig:
    """Decodes take one token per tile (rows = the GQA group); prefill tiles aim at 64 rows. Decodes over
    an FP8 cache run two warps a program: its tiles are half the bytes, and on an H200 more programs of
    fewer warps beat four warps a program at every batch of 64 or more sequences we timed. Split over the
    context (few sequences), they take 32-key tiles: at batch 1 the step is fastest with one short tile a
    program (docs/BENCHMARKS.md)."""
    group_p = next_pow2(group)
    # BLOCK_Q = 1 means "decode-only" to the kernels, so a step with longer queries takes at least 2.
    block_q = 1 if max_query_len == 1 else min(next_pow2(max_query_len), max(2, 64 // group_p))
    block_m = max(16, block_q * group_p)  # tl.dot needs at least 16 rows
    if dtype.itemsize <= 2:
        if kv_fp8 and block_q == 1:
            return LaunchConfig(block_q, block_m, block_n=64, num_warps=2, num_stages=3, split_block_n=32)
        return LaunchConfig(block_q, block_m, block_n=64, num_warps=4, num_stages=3)
    # float32 (tests, CPU-sized models): IEEE dots run on FMA units, so narrower key tiles and more warps
    # keep the accumulators in registers (ptxas, sm_90: no spills).
    return LaunchConfig(block_q, block_m, block_n=32 if block_q == 1 else 16, num_warps=8, num_stages=2)


MAX_SPLITS = 64


def choose_num_splits(num_programs: int, max_seq_len: int, sm_count: int, tile: int) -> int:
    """Split only when the unsplit grid leaves SMs idle; aim at about two programs per SM, down to one key
    tile a partition. At small batches the step's attention waits on its slowest program, and a program's
    time is mostly its tiles one after another: the more, shorter partitions, the sooner the last one ends,
    the merge's cost included (docs/BENCHMARKS.md)."""
    if num_programs >= sm_count:
        return 1
    splits = min(-(-2 * sm_count // num_programs), -(-max_seq_len // tile), MAX_SPLITS)
    return max(1, splits)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
    config: LaunchConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] holding the step's keys already.

    Only host values (shapes, num_seqs, max_query_len, max_seq_len) size the launch, so a decode batch is
    CUDA-graph capturable when its metadata carries fixed maxima. num_splits=None picks by heuristic;
    config overrides the tile shapes (benchmark sweeps). k_scale, v_scale: an FP8 cache's scales (None: 1).
    """
    T, hq, d = q.shape
    _, cache_block, hkv, _ = k_cache.shape
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged attention needs the head dimension contiguous")
    if meta.block_tables.stride(1) != 1:
        raise ValueError("paged attention needs block table rows contiguous")
    group = hq // hkv
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    cfg = config or launch_config(meta.max_query_len, group, q.dtype, kv_fp8)
    num_seqs = meta.num_seqs
    tiles = num_seqs if cfg.block_q == 1 else T // cfg.block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(tiles * hkv, meta.max_seq_len, sm_count(q.device), cfg.split_keys)
    out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
    if num_splits > 1:
        part_acc = torch.empty(num_splits, T, hq, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_splits, T, hq, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    block_d = max(16, next_pow2(d))
    pdl = pdl_options(q)
    if kv_fp8 and (k_scale is None or v_scale is None):
        k_scale = v_scale = torch.ones(1, dtype=torch.float32, device=q.device)
    pointers = (q, k_cache, v_cache, out, part_acc, part_ml, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                k_scale if kv_fp8 else out, v_scale if kv_fp8 else out)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
               meta.block_tables.stride(0))
    block_n = cfg.split_keys if num_splits > 1 else cfg.block_n
    common = dict(NUM_HEADS=hq, GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
                  CACHE_BLOCK=cache_block, SPLIT=num_splits > 1,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  KV_F16=kv_fp8 and q.dtype.itemsize == 2, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, **pdl)
    if cfg.block_q == 1 and kv_fp8:
        _paged_decode_kernel[(tiles, hkv, num_splits)](
            *pointers, scale * _LOG2E, T, num_splits, *strides, **common)
    else:
        _paged_attention_kernel[(tiles, hkv, num_splits)](
            *pointers, scale * _LOG2E, num_seqs, T, num_splits, *strides,
            GROUP_P=next_pow2(group), BLOCK_Q=cfg.block_q, KV_FP8=kv_fp8, **common)
    if num_splits > 1:
        _merge_splits_kernel[(T, hq)](
            part_acc, part_ml, out, T, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=hq, HEAD_DIM=d, BLOCK_D=block_d, SPLITS_P=next_pow2(num_splits),
            num_warps=4, **pdl,
        )
    return out


def variant_query_lengths(group: int, dtype: torch.dtype) -> dict[int, int]:
    """A query length for each tile height (BLOCK_Q) that `launch_config` picks for this GQA group."""
    return {launch_config(q, group, dtype).block_q: q for q in (1, 2, 4, 8, 16, 32, 64)}


def compile_step_variants(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, dtype: torch.dtype) -> int:
    """Compiles every query-tile height (BLOCK_Q) of the kernel, split and unsplit, on a dummy sequence over
    the real cache's first blocks (read only). Graph capture compiles only the shapes it captures; an eager
    step with a short prefill (a preempted sequence's recompute after a prefix hit, a chunk's tail) would
    otherwise compile its variant mid-serving, and a compile takes many steps' time while every running
    sequence waits. Returns the launches made."""
    from tokenq_kernels.attention_metadata import AttentionMetadata

    _, cache_block, hkv, d = k_cache.shape
    device, group = k_cache.device, num_heads // hkv
    i32 = dict(dtype=torch.int32, device=device)
    launches = 0
    for q_len in variant_query_lengths(group, dtype).values():
        ctx = 4 * cache_block + q_len
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(q_len, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, q_len], **i32), seq_lens=torch.tensor([ctx], **i32),
            block_tables=torch.zeros(1, -(-ctx // cache_block), **i32), max_query_len=q_len, max_seq_len=ctx,
            num_decodes=int(q_len == 1), query_start_loc_cpu=[0, q_len], seq_lens_cpu=[ctx])
        q = torch.randn(q_len, num_heads, d, dtype=dtype, device=device)
        for splits in (1, 2):
            paged_attention_triton(q, k_cache, v_cache, meta, d ** -0.5, num_splits=splits)
            launches += 1
    return launches
