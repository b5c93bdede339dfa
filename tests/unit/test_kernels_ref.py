"""Torch reference kernels against straightforward float64 formulas, on fresh random inputs every run."""

from __future__ import annotations

import math

import pytest
import torch

from tokenq_kernels.activation import silu_and_mul_ref
from tokenq_kernels.attention import paged_attention, paged_attention_ref
from tokenq_kernels.kv_cache import store_kv, store_kv_ref
from tokenq_kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from tokenq_kernels.rotary import rotary_ref
from worker.layers.context import AttentionMetadata
from worker.layers.rotary import RotaryEmbedding


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    a, b = a.double(), b.double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, err


def _step(q_lens: list[int], ctx_lens: list[int], hkv: int, d: int, bs: int, num_blocks: int):
    """Random caches and a random block layout: sequence i has ctx_lens[i] tokens of which its last
    q_lens[i] are this step's queries. Returns the caches (with the new keys already stored), new k/v and meta."""
    k_cache = torch.randn(num_blocks, bs, hkv, d)
    v_cache = torch.randn(num_blocks, bs, hkv, d)
    perm = torch.randperm(num_blocks).tolist()
    width = max(-(-n // bs) for n in ctx_lens) + 1  # one spare column of padding
    bt = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    slots, qsl = [], [0]
    for i, (ql, n) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        blocks = [perm.pop() for _ in range(-(-n // bs))]
        bt[i, : len(blocks)] = torch.tensor(blocks)
        slots += [blocks[p // bs] * bs + p % bs for p in range(n - ql, n)]
        qsl.append(qsl[-1] + ql)
    T = qsl[-1]
    k_new, v_new = torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=bt,
        max_query_len=max(q_lens),
        max_seq_len=max(ctx_lens),
        num_decodes=num_decodes,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(ctx_lens),
    )
    store_kv_ref(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    return k_cache, v_cache, k_new, v_new, meta


def _naive_attention(q, k_cache, v_cache, meta, scale):
    """Per sequence, per head, dense float64 attention with an explicit causal offset."""
    T, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(T, hq, d, dtype=torch.float64)
    for i in range(meta.num_seqs):
        a, b = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        n = meta.seq_lens_cpu[i]
        blocks = meta.block_tables[i, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:n].double()
        v = v_cache[blocks].reshape(-1, hkv, d)[:n].double()
        for j in range(b - a):
            visible = n - (b - a) + j + 1
            for h in range(hq):
                kv_h = h // (hq // hkv)
                s = (k[:visible, kv_h] @ q[a + j, h].double()) * scale
                out[a + j, h] = torch.softmax(s, 0) @ v[:visible, kv_h]
    return out


CASES = [
    # (q_lens, ctx_lens): decodes first, then prefill chunks
    ([1, 1, 1, 1, 1], [1, 7, 16, 33, 50]),  # decode only, incl. a context of one token
    ([13, 5], [13, 5]),  # whole-context prefills (the no-gather path)
    ([1, 1, 1, 9, 17, 4], [23, 2, 40, 9, 31, 4]),  # mixed: decodes, a fresh prefill, cached-context chunks
    ([1, 6], [17, 35]),  # one decode and one chunk on a long cached context
    ([1] * 40 + [3], [*range(2, 82, 2), 20]),  # many decodes of spread lengths: run in length groups
]


@pytest.mark.parametrize("q_lens,ctx_lens", CASES)
@pytest.mark.parametrize("hkv,group,d", [(3, 3, 64), (2, 4, 128), (5, 1, 64)])
@pytest.mark.parametrize("use_new_kv", [True, False])
def test_paged_attention_matches_naive(q_lens, ctx_lens, hkv, group, d, use_new_kv):
    bs = 16 if d == 64 else 5  # an odd block size too
    num_blocks = sum(-(-n // bs) for n in ctx_lens) + 3
    k_cache, v_cache, k_new, v_new, meta = _step(q_lens, ctx_lens, hkv, d, bs, num_blocks)
    q = torch.randn(sum(q_lens), hkv * group, d)
    scale = 1 / math.sqrt(d)
    kw = dict(k=k_new, v=v_new) if use_new_kv else {}
    out = paged_attention_ref(q, k_cache, v_cache, meta, scale, **kw)
    assert out.shape == q.shape
    _close(out, _naive_attention(q, k_cache, v_cache, meta, scale))
    _close(paged_attention(q, k_cache, v_cache, meta, scale, **kw), out, 1e-7)


@pytest.mark.parametrize("q_lens,ctx_lens", [CASES[0], CASES[2], CASES[4]])
def test_decode_plan_is_built_once_per_step_and_serves_every_layer(q_lens, ctx_lens):
    """Two layers (different caches) read one step's metadata: the second reuses the first's gather plan and
    still attends over its own cache."""
    bs, hkv, d = 16, 3, 64
    num_blocks = sum(-(-n // bs) for n in ctx_lens) + 3
    k0, v0, _, _, meta = _step(q_lens, ctx_lens, hkv, d, bs, num_blocks)
    k1, v1 = torch.randn_like(k0), torch.randn_like(v0)
    q = torch.randn(sum(q_lens), hkv * 3, d)
    out0 = paged_attention_ref(q, k0, v0, meta, 0.125)
    assert len(meta.ref_cache) == 1
    plans = next(iter(meta.ref_cache.values()))
    out1 = paged_attention_ref(q, k1, v1, meta, 0.125)
    assert next(iter(meta.ref_cache.values())) is plans
    _close(out0, _naive_attention(q, k0, v0, meta, 0.125))
    _close(out1, _naive_attention(q, k1, v1, meta, 0.125))


def test_store_kv_writes_exactly_the_slots():
    nb, bs, h, d = 11, 3, 2, 5
    k_cache, v_cache = torch.randn(nb, bs, h, d), torch.randn(nb, bs, h, d)
    k0, v0 = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(nb * bs)[:7]
    k, v = torch.randn(7, h, d), torch.randn(7, h, d)
    store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, h, d), v_cache.view(-1, h, d)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], k0.view(-1, h, d)[untouched])
    assert torch.equal(flat_v[untouched], v0.view(-1, h, d)[untouched])


def test_store_kv_accepts_strided_views():
    # k and v arrive as slices of the fused qkv output.
    qkv = torch.randn(6, (4 + 2 + 2) * 8)
    k = qkv[:, 32:48].view(6, 2, 8)
    v = qkv[:, 48:].view(6, 2, 8)
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    slots = torch.tensor([15, 0, 4, 9, 2, 3])
    store_kv_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 8)[slots], k) and torch.equal(v_cache.view(-1, 2, 8)[slots], v)


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 576)])
def test_rms_norm_and_fused_add(shape):
    x, res, w = torch.randn(shape), torch.randn(shape), torch.rand(shape[-1]) + 0.5
    eps = 1e-5

    def ref(t):
        t = t.double()
        return w.double() * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    _close(rms_norm_ref(x, w, eps), ref(x))
    normed, new_res = fused_add_rms_norm_ref(x, res, w, eps)
    _close(new_res, x.double() + res.double())
    _close(normed, ref(x + res))
    # bfloat16 in, bfloat16 out, with the statistic computed in float32
    assert rms_norm_ref(x.bfloat16(), w.bfloat16(), eps).dtype == torch.bfloat16


def test_silu_and_mul():
    x = torch.randn(9, 2 * 37)
    g, u = x.double()[:, :37], x.double()[:, 37:]
    _close(silu_and_mul_ref(x), g / (1 + torch.exp(-g)) * u)


@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (128, 4, 1)])
def test_rotary_matches_complex_rotation(d, hq, hkv):
    T, base = 11, 10000.0
    rope = RotaryEmbedding(d, 300, base)
    positions = torch.randint(0, 300, (T,))
    q, k = torch.randn(T, hq * d), torch.randn(T, hkv * d)
    q_out, k_out = rotary_ref(positions, q, k, rope.cos_sin_cache, d)
    assert q_out.shape == q.shape and k_out.shape == k.shape

    def ref(x, h):
        x = x.double().view(T, h, d)
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = positions.double()[:, None, None] * inv  # [T, 1, D/2]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1).view(T, -1)

    # The float32 angle table loses ~position * 6e-8 rad (1e-5 relative at position 300), so hold
    # float32 to the 1e-4 bound rather than a tighter one that random inputs can cross.
    _close(q_out, ref(q, hq), 1e-4)
    _close(k_out, ref(k, hkv), 1e-4)


def test_llama3_rope_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    rope = RotaryEmbedding(128, 20000, 500000.0, scaling)
    pos = torch.tensor([0, 1, 8191, 8192, 19999])
    freqs = pos.float()[:, None] * hf_inv.float()[None]
    expected = torch.cat((freqs.cos(), freqs.sin()), -1)
    assert torch.equal(rope.cos_sin_cache[pos], expected)
    # and the scaling really changed something
    assert not torch.equal(RotaryEmbedding(128, 20000, 500000.0).cos_sin_cache[pos], expected)
