"""Triton kernels against their torch references, on fresh random inputs every run (no fixed seed).

Error measure: rel_err(a, b) = max|a - b| / max|b|; bfloat16 kernels must stay under 1e-2, float32 ones
under 1e-4. Attention and rotary (one rounding at the end) are compared with the reference run in float32
on the same upcast inputs; RMSNorm and SiLU, which round where their references round, with the reference
in the kernel's own dtype (against float32, their two or three bf16 roundings could add up past 1e-2).

The check_* functions take a device, so tests/unit/test_kernels_triton_interp.py runs the same checks on
tiny sizes under the Triton interpreter on a CPU, and tests/gpu/bench_kernels.py runs them before timing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from tokenq_kernels.activation import silu_and_mul_ref
from tokenq_kernels.attention import paged_attention_ref
from tokenq_kernels.gemv import GemvConfig, gemv_config, linear_ref
from tokenq_kernels.kv_cache import store_kv_ref
from tokenq_kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from tokenq_kernels.rotary import rotary_ref
from tokenq_kernels.sampling import GREEDY_BELOW, gumbel_argmax_ref, row_keys, sample
from worker.layers.context import AttentionMetadata
from worker.layers.rotary import RotaryEmbedding

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < TOLERANCE[dtype], f"{name}: rel err {err:.3g} >= {TOLERANCE[dtype]} ({dtype})"
    return err


def _odd_len(lo: int, hi: int, block_size: int) -> int:
    """A random length in [lo, hi] that is not a multiple of the block size (unless it must be 1)."""
    n = random.randint(lo, hi)
    return n + 1 if n % block_size == 0 else n


# ---- paged attention ------------------------------------------------------------------------------


def make_step(
    q_lens: list[int], ctx_lens: list[int], hkv: int, d: int, block_size: int, dtype: torch.dtype, device: str
):
    """Caches as the model runner binds them (views of one [L, 2, N, bs, Hkv, D] tensor), blocks in a random
    order, padding columns of the block table holding random valid ids, a block table that is a column
    slice of a wider one, and the step's keys already stored. Returns (k_cache, v_cache, meta)."""
    need = sum(-(-n // block_size) for n in ctx_lens)
    num_blocks = need + 5
    kv = torch.randn(2, 2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    perm = torch.randperm(num_blocks).tolist()
    width = max(-(-n // block_size) for n in ctx_lens) + 2
    wide = torch.randint(0, num_blocks, (len(ctx_lens), width + 3), dtype=torch.int32)
    slots, qsl = [], [0]
    for i, (ql, n) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        blocks = [perm.pop() for _ in range(-(-n // block_size))]
        wide[i, 1 : 1 + len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n - ql, n)]
        qsl.append(qsl[-1] + ql)
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1:
        num_decodes += 1
    wide = wide.to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=wide[:, 1 : 1 + width],  # strided rows, as a slice of the runner's buffer is
        max_query_len=max(q_lens),
        max_seq_len=max(ctx_lens),
        num_decodes=num_decodes,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(ctx_lens),
    )
    T = qsl[-1]
    k_new = torch.randn(T, hkv, d, dtype=dtype, device=device)
    v_new = torch.randn(T, hkv, d, dtype=dtype, device=device)
    store_kv_ref(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    return k_cache, v_cache, meta


def check_attention(
    q_lens: list[int],
    ctx_lens: list[int],
    hkv: int,
    group: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    num_splits: int | None,
) -> float:
    from tokenq_kernels.attention_triton import paged_attention_triton

    k_cache, v_cache, meta = make_step(q_lens, ctx_lens, hkv, d, block_size, dtype, device)
    hq = hkv * group
    T = sum(q_lens)
    # q as the model has it: a strided view of the fused qkv output.
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(T, hq, d)
    scale = 1 / math.sqrt(d)
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    return assert_close(f"attention q={q_lens} ctx={ctx_lens} splits={num_splits}", out, ref, dtype)


def attention_case(kind: str, block_size: int, tiny: bool) -> tuple[list[int], list[int]]:
    """Random lengths of a kind of step: odd counts, lengths off the block boundaries."""
    bs, s = block_size, (1 if tiny else 8)
    if kind == "decode":
        n = random.choice([1, 3, 5] if tiny else [1, 7, 33])
        ctx = [_odd_len(1, 40 * s, bs) for _ in range(n)]
        return [1] * n, ctx
    if kind == "mixed":  # decodes, a fresh prefill, chunks over a cached prefix
        dec = [_odd_len(2, 30 * s, bs) for _ in range(random.choice([1, 3]))]
        fresh = _odd_len(2, 9, bs) if tiny else _odd_len(70, 320, bs)  # past 64: the widest query tile
        chunk = _odd_len(2, (7 if tiny else 20) * s, bs)
        cached = chunk + _odd_len(1, 20 * s, bs)
        small = random.randint(1, 3)
        q = [1] * len(dec) + [fresh, chunk, small]
        return q, [*dec, fresh, cached, small + random.randint(0, 5 * s)]
    if kind == "long":  # few sequences, long contexts: the split-K regime
        n = random.choice([1, 3])
        return [1] * n, [_odd_len(100 * s if not tiny else 40, 600 * s if not tiny else 90, bs) for _ in range(n)]
    raise ValueError(kind)


# ---- KV-cache store -------------------------------------------------------------------------------


def check_store_kv(T: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.kv_cache_triton import store_kv_triton

    num_blocks = -(-T // block_size) + 3
    kv = torch.randn(2, 2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    k_cache, v_cache = kv[0, 0], kv[0, 1]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.2] = -1  # padding rows: skipped
    qkv = torch.randn(T, (2 * hkv + 3) * d, dtype=dtype, device=device)  # k and v as strided views
    k = qkv[:, 3 * d : (3 + hkv) * d].view(T, hkv, d)
    v = qkv[:, (3 + hkv) * d :].view(T, hkv, d)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "store_kv: caches differ"
    return 0.0


def check_store_kv_fp8_ties(T: int, hkv: int, d: int, device: str, store: Callable | None = None) -> int:
    """An FP8 cache stores the bytes the reference stores (x / scale rounded as torch rounds it), for values
    next to the midpoints between e4m3 neighbours, where a division off by an ulp rounds the other way.
    Returns how many bytes differ (the assertion is the caller's, so a one-off script can count them)."""
    from tokenq_kernels.fp8 import FP8
    from tokenq_kernels.kv_cache_triton import store_kv_triton

    store = store or store_kv_triton
    grid = torch.arange(0, 127, dtype=torch.uint8, device=device).view(FP8).float()  # every finite e4m3 >= 0
    mids = (grid[1:] + grid[:-1]) / 2
    scales = (torch.rand(1, device=device) + 0.5, torch.rand(1, device=device) + 0.5)
    picks = mids[torch.randint(0, len(mids), (2, T, hkv, d), device=device)]
    signs = torch.randint(0, 2, picks.shape, device=device) * 2 - 1
    nudge = torch.randint(-2, 3, picks.shape, device=device).float()  # a few ulps either side of the midpoint
    x = picks * signs * torch.stack(scales).view(2, 1, 1, 1)
    x = x + nudge * torch.finfo(torch.float32).eps * x.abs()
    caches = torch.zeros(2, -(-T // 16), 16, hkv, d, dtype=FP8, device=device)
    ref = caches.clone()
    slots = torch.randperm(caches.shape[1] * 16, device=device)[:T]
    store(x[0], x[1], caches[0], caches[1], slots, *scales)
    store_kv_ref(x[0], x[1], ref[0], ref[1], slots, *scales)
    return int((caches.view(torch.uint8) != ref.view(torch.uint8)).sum())


# ---- RMSNorm, rotary, SiLU ------------------------------------------------------------------------


def check_rms_norm(rows: int, n: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.norm_triton import fused_add_rms_norm_triton, rms_norm_triton

    x = torch.randn(rows, n, dtype=dtype, device=device) * 3
    res = torch.randn(rows, n, dtype=dtype, device=device)
    w = (torch.rand(n, device=device) + 0.5).to(dtype)
    eps = 1e-5
    err = assert_close("rms_norm", rms_norm_triton(x, w, eps), rms_norm_ref(x, w, eps), dtype)
    normed, new_res = fused_add_rms_norm_triton(x, res, w, eps)
    ref_normed, ref_res = fused_add_rms_norm_ref(x, res, w, eps)
    err = max(err, assert_close("fused_add_rms_norm (residual)", new_res, ref_res, dtype))
    return max(err, assert_close("fused_add_rms_norm", normed, ref_normed, dtype))


def check_rotary(T: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.rotary_triton import rotary_triton

    rope = RotaryEmbedding(d, 20000, 500000.0, LLAMA3_SCALING)
    cache = rope.cos_sin_cache.to(device=device, dtype=dtype)  # the model builds it in its own dtype
    positions = torch.randint(0, 20000, (T,), device=device)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d]
    ref_q, ref_k = rotary_ref(positions, q.float(), k.float(), cache.float(), d)
    out_q, out_k = rotary_triton(positions, q, k, cache, d)
    assert out_q.data_ptr() == q.data_ptr(), "rotary must work in place"
    err = assert_close("rotary q", out_q, ref_q, dtype)
    return max(err, assert_close("rotary k", out_k, ref_k, dtype))


def check_rotary_store_kv(T: int, hq: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, device: str,
                          fp8_cache: bool = False) -> float:
    """The fused kernel rotates q and k in place as the float32 reference does, and stores exactly what the
    store kernel's reference stores of its rotated k and of v (padding rows skipped)."""
    from tokenq_kernels.fp8 import FP8
    from tokenq_kernels.rotary_kv_triton import rotary_store_kv_triton

    rope = RotaryEmbedding(d, 20000, 500000.0, LLAMA3_SCALING)
    cache = rope.cos_sin_cache.to(device=device, dtype=dtype)
    positions = torch.randint(0, 20000, (T,), device=device)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]
    ref_q, ref_k = rotary_ref(positions, q.float(), k.float(), cache.float(), d)
    num_blocks = -(-T // block_size) + 3
    caches = torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    scales = (None, None)
    if fp8_cache:
        caches = caches.to(FP8)
        scales = (torch.rand(1, device=device) + 0.5, torch.rand(1, device=device) + 0.5)
    ref_caches = caches.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.2] = -1  # padding rows: nothing stored
    out_q, out_k = rotary_store_kv_triton(positions, q, k, v, cache, d, caches[0], caches[1], slots, *scales)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "q and k rotate in place"
    err = max(assert_close("rotary_store_kv q", out_q, ref_q, dtype),
              assert_close("rotary_store_kv k", out_k, ref_k, dtype))
    store_kv_ref(out_k.view(T, hkv, d), v.view(T, hkv, d), ref_caches[0], ref_caches[1], slots, *scales)
    as_bits = (lambda c: c.view(torch.uint8)) if fp8_cache else (lambda c: c)
    assert torch.equal(as_bits(caches), as_bits(ref_caches)), "rotary_store_kv: caches differ from the store's"
    return err


def check_silu_and_mul(rows: int, inter: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.activation_triton import silu_and_mul_triton

    x = torch.randn(rows, 2 * inter, dtype=dtype, device=device) * 2
    return assert_close("silu_and_mul", silu_and_mul_triton(x), silu_and_mul_ref(x), dtype)


# ---- GEMV (small-batch linear) ---------------------------------------------------------------------


def check_gemv(rows: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool = False,
               cfg: GemvConfig | None = None) -> float:
    """Against F.linear in float32 on the same inputs; cfg None: the dispatcher's tiles for this shape
    (or a default, where it would send the shape to cuBLAS)."""
    from tokenq_kernels.gemv_triton import gemv_triton

    x = torch.randn(rows, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    cfg = cfg or gemv_config(rows, n, k) or GemvConfig(16, 256)
    ref = linear_ref(x.float(), w.float(), None if b is None else b.float())
    return assert_close(f"gemv {tuple(cfg)}", gemv_triton(x, w, b, cfg), ref, dtype)


# ---- sampling -------------------------------------------------------------------------------------


def check_sampling_matches_ref(B: int, V: int, device: str) -> float:
    """The same keys give the same tokens in the kernel and the reference (the noise is one hash)."""
    from tokenq_kernels.sampling_triton import gumbel_argmax_triton

    logits = torch.randn(B, V, device=device) * 3
    temperature = torch.rand(B, device=device) * 1.5 + 0.1
    temperature[torch.rand(B, device=device) < 0.3] = 0.0
    greedy = temperature < GREEDY_BELOW
    inv_t = torch.where(greedy, 1.0, 1.0 / temperature.clamp_min(GREEDY_BELOW))
    keys = row_keys(torch.randint(0, 2**62, (B,), device=device), torch.randint(0, 5000, (B,), device=device))
    got = gumbel_argmax_triton(logits, inv_t, greedy, keys)
    want = gumbel_argmax_ref(logits, inv_t, greedy, keys)
    assert torch.equal(got[greedy], logits[greedy].argmax(1)), "greedy rows must be exactly argmax"
    agree = (got == want).float().mean().item()
    # Only a float near-tie between two noisy scores (an ulp of log) may flip a row.
    assert agree >= 0.99, f"sampling: kernel and reference agree on {agree:.1%} of rows"
    return 1.0 - agree


def check_argmax(B: int, V: int, dtype: torch.dtype, device: str) -> float:
    """The greedy kernel picks torch.argmax's token, the first on ties: bfloat16 logits tie often, and each
    row also holds its maximum twice more, later in the row than a first copy."""
    from tokenq_kernels.sampling_triton import argmax_triton

    logits = (torch.randn(B, V, device=device) * 3).to(dtype)
    top = logits.max(dim=1).values + 1
    for row in range(B):
        cols = torch.randperm(V, device=device)[:3].sort().values
        logits[row, cols] = top[row]
    got = argmax_triton(logits)
    want = logits.argmax(dim=1)
    assert torch.equal(got, want), f"argmax: {(got != want).sum().item()} of {B} rows differ from torch.argmax"
    return 0.0


def check_sampling_distribution(V: int, draws: int, device: str) -> float:
    """Many seeded draws of one row (steps 0..draws-1) follow softmax(logits / T): a chi-square test."""
    logits = (torch.randn(1, V, device=device) * 1.5).expand(draws, V).contiguous()
    t = random.uniform(0.6, 1.4)
    temperature = torch.full((draws,), t, device=device)
    seed = random.randrange(2**62)
    seeds = torch.full((draws,), seed, dtype=torch.int64, device=device)
    steps = torch.arange(draws, device=device)
    tokens = sample(logits, temperature, seeds=seeds, steps=steps)
    again = sample(logits, temperature, seeds=seeds, steps=steps)
    assert torch.equal(tokens, again), "seeded draws must repeat"
    expected = torch.softmax(logits[0].double() / t, 0).cpu() * draws
    counts = torch.bincount(tokens.cpu(), minlength=V).double()
    # Tokens expected fewer than 5 times are pooled into one bin, as a chi-square test needs.
    rare = expected < 5
    expected = torch.cat((expected[~rare], expected[rare].sum()[None]))
    counts = torch.cat((counts[~rare], counts[rare].sum()[None]))
    chi2 = (((counts - expected) ** 2) / expected.clamp_min(1e-9)).sum().item()
    dof = max(1, len(expected) - 1)
    # Mean dof, sd sqrt(2 dof): 8 sd out (plus slack for the pooled bin) is a broken sampler, not bad luck.
    limit = dof + 8 * math.sqrt(2 * dof) + 10
    assert chi2 < limit, f"sampling: chi2 {chi2:.1f} >= {limit:.1f} over {len(expected)} bins"
    return chi2


def check_sampling_truncation(B: int, V: int, device: str) -> float:
    """Top-k and top-p keep their sets; greedy rows stay exact argmax whatever their top-k/top-p."""
    logits = torch.randn(B, V, device=device) * 2
    temperature = torch.rand(B, device=device) + 0.5
    temperature[0] = 0.0
    top_k = torch.randint(1, 6, (B,), device=device)
    top_p = torch.rand(B, device=device) * 0.5 + 0.2
    seeds = torch.full((B,), -1, dtype=torch.int64, device=device)
    seeds[1] = 7
    tokens = sample(logits, temperature, top_k=top_k, seeds=seeds)
    ranks = (logits > logits.gather(1, tokens[:, None])).sum(1)  # how many logits beat the token
    assert bool((ranks < top_k).all()), "top-k: a token outside the k best"
    tokens = sample(logits, temperature, top_p=top_p, seeds=seeds)
    assert tokens[0].item() == logits[0].argmax().item(), "greedy row must be argmax"
    probs = torch.softmax(logits / temperature.clamp_min(GREEDY_BELOW)[:, None], 1)
    mass_before = (probs * (probs > probs.gather(1, tokens[:, None]))).sum(1)
    assert bool((mass_before[1:] < top_p[1:] + 1e-5).all()), "top-p: a token outside the nucleus"
    return 0.0


# ---- everything, for the interpreter test and the benchmark ----------------------------------------


def all_checks(device: str, tiny: bool) -> list[tuple[str, Callable[[], float]]]:
    """(name, check) pairs; tiny sizes for the interpreter, model-like ones for a GPU."""
    dtypes = [torch.float32, torch.bfloat16]
    checks: list[tuple[str, Callable[[], float]]] = []
    gqa = [(2, 4, 64), (1, 8, 32), (3, 1, 64)] if tiny else [(8, 1, 128), (8, 4, 128), (2, 8, 64), (4, 4, 64)]
    block_sizes = [16, 8] if tiny else [16, 32]
    shapes = [(kind, g) for kind in ["decode", "mixed", "long"] for g in gqa]
    if tiny:  # the interpreter is slow: each (kind, GQA shape) once, the dtypes taking turns
        combos = [(kind, g, dtypes[i % 2]) for i, (kind, g) in enumerate(shapes)]
    else:
        combos = [(kind, g, dtype) for kind, g in shapes for dtype in dtypes]
    for kind, (hkv, group, d), dtype in combos:
        bs = random.choice(block_sizes)
        for splits in [1, 3] if tiny else [None, 1, 4]:

            def run(kind=kind, hkv=hkv, group=group, d=d, bs=bs, dtype=dtype, splits=splits) -> float:
                q, ctx = attention_case(kind, bs, tiny)
                return check_attention(q, ctx, hkv, group, d, bs, dtype, device, splits)

            name = f"attention {kind} hkv={hkv} group={group} d={d} bs={bs} {_short(dtype)} splits={splits}"
            checks.append((name, run))
    for dtype in dtypes:
        t = _short(dtype)
        if tiny:
            checks += [
                (f"store_kv {t}", lambda dtype=dtype: check_store_kv(13, 3, 32, 4, dtype, device)),
                (f"rms_norm {t}", lambda dtype=dtype: check_rms_norm(5, 100, dtype, device)),
                (f"rotary {t}", lambda dtype=dtype: check_rotary(7, 6, 2, 64, dtype, device)),
                (f"rotary_store_kv {t}", lambda dtype=dtype: check_rotary_store_kv(7, 6, 2, 64, 4, dtype, device)),
                (f"rotary_store_kv fp8 {t}", lambda dtype=dtype: check_rotary_store_kv(7, 6, 2, 64, 4, dtype, device,
                                                                                     True)),
                (f"silu_and_mul {t}", lambda dtype=dtype: check_silu_and_mul(3, 1500, dtype, device)),
                (f"gemv {t}", lambda dtype=dtype: check_gemv(1, 40, 300, dtype, device, cfg=GemvConfig(16, 64))),
                (f"gemv rows {t}", lambda dtype=dtype: check_gemv(3, 37, 1000, dtype, device, True,
                                                                  GemvConfig(8, 128))),
            ]
        else:
            checks += [
                (f"store_kv {t}", lambda dtype=dtype: check_store_kv(777, 8, 128, 16, dtype, device)),
                (f"rms_norm {t}", lambda dtype=dtype: check_rms_norm(333, 4096, dtype, device)),
                (f"rms_norm odd {t}", lambda dtype=dtype: check_rms_norm(17, 5003, dtype, device)),
                (f"rotary {t}", lambda dtype=dtype: check_rotary(333, 32, 8, 128, dtype, device)),
                (f"rotary d=64 {t}", lambda dtype=dtype: check_rotary(77, 9, 3, 64, dtype, device)),
                (f"rotary_store_kv {t}", lambda dtype=dtype: check_rotary_store_kv(333, 32, 8, 128, 16, dtype, device)),
                (f"rotary_store_kv fp8 {t}", lambda dtype=dtype: check_rotary_store_kv(77, 9, 3, 64, 16, dtype, device,
                                                                                     True)),
                (f"silu_and_mul {t}", lambda dtype=dtype: check_silu_and_mul(97, 14336, dtype, device)),
                (f"gemv o_proj {t}", lambda dtype=dtype: check_gemv(1, 4096, 4096, dtype, device)),
                (f"gemv down {t}", lambda dtype=dtype: check_gemv(1, 4096, 14336, dtype, device)),
                (f"gemv odd rows {t}", lambda dtype=dtype: check_gemv(3, 1001, 3001, dtype, device, True,
                                                                      GemvConfig(16, 256))),
            ]
    if tiny:
        checks += [
            ("sampling vs reference", lambda: check_sampling_matches_ref(9, 3000, device)),
            ("sampling argmax", lambda: check_argmax(3, 5000, torch.float32, device)),
            ("sampling distribution", lambda: check_sampling_distribution(7, 3000, device)),
            ("sampling top-k/top-p", lambda: check_sampling_truncation(5, 50, device)),
        ]
    else:
        checks += [
            ("sampling vs reference", lambda: check_sampling_matches_ref(67, 128256, device)),
            ("sampling argmax", lambda: check_argmax(67, 128256, torch.bfloat16, device)),
            ("sampling distribution", lambda: check_sampling_distribution(13, 20000, device)),
            ("sampling top-k/top-p", lambda: check_sampling_truncation(33, 32000, device)),
        ]
    return checks


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_checks(device: str, tiny: bool, bf16_tolerance: float = 1e-2) -> dict[str, str | None]:
    """Runs every check; name -> None on success, else the error text. The interpreter narrows to bfloat16
    by truncation where a GPU rounds to nearest, so its runs pass a looser bf16_tolerance."""
    results: dict[str, str | None] = {}
    saved = TOLERANCE[torch.bfloat16]
    TOLERANCE[torch.bfloat16] = bf16_tolerance
    try:
        for name, check in all_checks(device, tiny):
            try:
                check()
                results[name] = None
            except Exception as e:  # a report, not a test: keep going and list every failure
                results[name] = f"{type(e).__name__}: {e}"
    finally:
        TOLERANCE[torch.bfloat16] = saved
    return results


# ---- pytest, on a GPU -------------------------------------------------------------------------------

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")
DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("kind", ["decode", "mixed", "long"])
@pytest.mark.parametrize("hkv,group,d", [(8, 1, 128), (8, 4, 128), (4, 8, 128), (2, 4, 64), (3, 8, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_attention(kind, hkv, group, d, dtype, num_splits):
    q, ctx = attention_case(kind, 16, tiny=False)
    check_attention(q, ctx, hkv, group, d, 16, dtype, "cuda", num_splits)


@pytest.mark.parametrize("block_size", [8, 32, 64])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_attention_other_block_sizes(block_size, kind, num_splits):
    q, ctx = attention_case(kind, block_size, tiny=False)
    check_attention(q, ctx, 8, 4, 128, block_size, torch.bfloat16, "cuda", num_splits)


def test_paged_attention_dispatcher_picks_triton_and_matches():
    from tokenq_kernels.attention import paged_attention

    k_cache, v_cache, meta = make_step([1, 1, 1, 20], [35, 17, 300, 20], 8, 128, 16, torch.bfloat16, "cuda")
    q = torch.randn(23, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = paged_attention(q, k_cache, v_cache, meta, 128**-0.5)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, 128**-0.5)
    assert_close("dispatch", out, ref, torch.bfloat16)


@pytest.mark.parametrize("batch", [3, 16])
def test_decode_attention_is_graph_capturable(batch):
    """Captured once with fixed maxima (as worker/engine/cuda_graphs.py does), replayed over new lengths,
    block tables and queries written into the same buffers."""
    from tokenq_kernels.attention_triton import paged_attention_triton

    hkv, group, d, bs, max_len = 8, 4, 128, 16, 4096
    k_cache, v_cache, meta = make_step([1] * batch, [max_len] * batch, hkv, d, bs, torch.bfloat16, "cuda")
    q = torch.randn(batch, hkv * group, d, dtype=torch.bfloat16, device="cuda")
    paged_attention_triton(q, k_cache, v_cache, meta, d**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_triton(q, k_cache, v_cache, meta, d**-0.5)
    for _ in range(2):
        lens = [_odd_len(1, max_len, bs) for _ in range(batch)]
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        perm = torch.randperm(meta.block_tables.numel()) % k_cache.shape[0]
        meta.block_tables.copy_(perm.view_as(meta.block_tables).to(torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        step = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                 1, max(lens), batch, meta.query_start_loc_cpu, lens)
        ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), step, d**-0.5)
        assert_close("graph replay", out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hkv,d,bs", [(1, 8, 128, 16), (777, 8, 128, 16), (131, 3, 64, 32)])
def test_store_kv(T, hkv, d, bs, dtype):
    check_store_kv(T, hkv, d, bs, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 576), (333, 4096), (17, 5003), (5, 8192)])
def test_rms_norm(rows, n, dtype):
    check_rms_norm(rows, n, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hq,hkv,d", [(1, 32, 8, 128), (333, 32, 8, 128), (77, 9, 3, 64), (5, 64, 8, 128)])
def test_rotary(T, hq, hkv, d, dtype):
    check_rotary(T, hq, hkv, d, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("T,hq,hkv,d", [(1, 32, 8, 128), (333, 32, 8, 128), (77, 9, 3, 64)])
def test_rotary_store_kv(T, hq, hkv, d, dtype, fp8_cache):
    check_rotary_store_kv(T, hq, hkv, d, 16, dtype, "cuda", fp8_cache)


def test_store_kv_fp8_rounds_as_torch():
    assert check_store_kv_fp8_ties(4096, 8, 128, "cuda") == 0, "FP8 cache bytes differ from the reference's"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (97, 14336), (3, 1001)])
def test_silu_and_mul(rows, inter, dtype):
    check_silu_and_mul(rows, inter, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,bias", [(1, 4096, 4096, False), (1, 6144, 4096, True), (1, 4096, 14336, False),
                                           (1, 28672, 4096, False), (2, 1001, 3001, True), (1, 128256, 4096, False)])
def test_gemv_dispatch_tiles(rows, n, k, bias, dtype):
    check_gemv(rows, n, k, dtype, "cuda", bias)


@pytest.mark.parametrize("cfg", [GemvConfig(4, 1024, 8, 3), GemvConfig(32, 256, 4, 1), GemvConfig(8, 512),
                                 GemvConfig(16, 128, 8, 2)])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_gemv_any_tiles(cfg, rows):
    check_gemv(rows, 1000 + random.randint(0, 99), 2048 + random.randint(1, 999), torch.bfloat16, "cuda", True, cfg)


@pytest.mark.parametrize("B,V", [(1, 128256), (67, 128256), (300, 49152)])
def test_sampling_matches_reference(B, V):
    check_sampling_matches_ref(B, V, "cuda")


@pytest.mark.parametrize("B,V", [(1, 128256), (2, 1000), (67, 128256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_matches_torch(B, V, dtype):
    check_argmax(B, V, dtype, "cuda")


def test_sampling_distribution():
    check_sampling_distribution(13, 20000, "cuda")


def test_sampling_truncation():
    check_sampling_truncation(33, 32000, "cuda")


def test_sampling_has_no_host_sync():
    B, V = 64, 32000
    logits = torch.randn(B, V, device="cuda")
    temperature = torch.rand(B, device="cuda")
    top_k = torch.randint(0, 50, (B,), device="cuda")
    top_p = torch.rand(B, device="cuda") * 0.5 + 0.5
    seeds = torch.randint(-1, 100, (B,), device="cuda")
    steps = torch.randint(0, 100, (B,), device="cuda")
    sample(logits, temperature, top_k, top_p, None, seeds, steps)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, temperature, top_k, top_p, None, seeds, steps)
        sample(logits, temperature)
    finally:
        torch.cuda.set_sync_debug_mode("default")
