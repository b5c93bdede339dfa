"""FP8 on a GPU: each FP8 Triton kernel against its torch reference on fresh random inputs (odd sizes
included), the FP8 linear (torch._scaled_mm, the GEMV at one row), the FP8 KV cache through the store and
attention kernels, and a random model's teacher-forced logits in bfloat16 against the same weights in FP8.

The check_* functions take a device, so tests/unit/test_kernels_triton_interp.py runs them on tiny sizes
under the Triton interpreter on a CPU (run_fp8_checks).

Quantized outputs are compared after dequantization: the kernel and the reference pick the same scale (to
float rounding) and the same e4m3 code for almost every element; a division that rounds the other way can
move an element by one code, so a few differing codes are allowed, never a wrong scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from tests.asserts import assert_agree_until_near_tie
from tests.gpu.test_kernels_triton import TOLERANCE, assert_close, attention_case, make_step, rel_err
from tokenq_kernels.fp8 import (
    FP8,
    QuantizedInput,
    fp8_gemv_ref,
    quantize_rows_ref,
    rms_norm_quant_ref,
    scaled_mm_ref,
    silu_and_mul_quant_ref,
)
from tokenq_kernels.kv_cache import store_kv_ref

# Share of e4m3 codes that may differ by a rounding of the division.
MAX_CODE_MISMATCH = 0.01


def code_ordinal(q: torch.Tensor) -> torch.Tensor:
    """Each e4m3 value's place on the number line: adjacent representable values are one apart (the sign
    bit aside, e4m3's bit patterns count up with the magnitude, subnormals included)."""
    bits = q.view(torch.uint8).to(torch.int16)
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def assert_same_quantization(name: str, got: tuple[torch.Tensor, torch.Tensor],
                             want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Same scales, and every code at most one representable value from the reference's. Counted in codes,
    not relative error: below e4m3's normal range (2^-6 of the scale) one code is more than 1/8 of a value."""
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == FP8 and q.shape == q_ref.shape, f"{name}: {q.dtype} {tuple(q.shape)}"
    assert s.shape == s_ref.shape, f"{name}: scale shape {tuple(s.shape)} != {tuple(s_ref.shape)}"
    scale_err = rel_err(s, s_ref)
    assert scale_err < 1e-5, f"{name}: scales differ by {scale_err:.3g}"
    mismatch = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    assert mismatch <= MAX_CODE_MISMATCH, f"{name}: {mismatch:.2%} of the e4m3 codes differ"
    worst = (code_ordinal(q) - code_ordinal(q_ref)).abs().max().item()
    assert worst <= 1, f"{name}: an element moved {worst} e4m3 codes (more than one)"
    return mismatch


# ---- quantization kernels ----------------------------------------------------------------------------


def check_quantize_rows(rows: int, n: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.fp8_triton import quantize_rows_triton

    x = torch.randn(rows, n, device=device).mul(torch.rand(rows, 1, device=device) * 10).to(dtype)
    x[0] = 0  # a row of zeros: a floor scale, zeros, no NaN
    got = quantize_rows_triton(x)
    assert not got[0].float().isnan().any(), "quantize_rows: NaN codes"
    return assert_same_quantization("quantize_rows", got, quantize_rows_ref(x))


def check_rms_norm_quant(rows: int, n: int, dtype: torch.dtype, device: str, residual: bool) -> float:
    from tokenq_kernels.fp8_triton import rms_norm_quant_triton

    x = torch.randn(rows, n, dtype=dtype, device=device) * 3
    res = torch.randn(rows, n, dtype=dtype, device=device) if residual else None
    w = (torch.rand(n, device=device) + 0.5).to(dtype)
    got, got_res = rms_norm_quant_triton(x, res, w, 1e-5)
    want, want_res = rms_norm_quant_ref(x, res, w, 1e-5)
    assert got.dtype == want.dtype == dtype
    if residual:
        assert_close("rms_norm_quant residual", got_res, want_res, dtype)
    return assert_same_quantization("rms_norm_quant", (got.q, got.scale), (want.q, want.scale))


def check_silu_and_mul_quant(rows: int, inter: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.fp8_triton import silu_and_mul_quant_triton

    x = torch.randn(rows, 2 * inter, dtype=dtype, device=device) * 2
    got, want = silu_and_mul_quant_triton(x), silu_and_mul_quant_ref(x)
    return assert_same_quantization("silu_and_mul_quant", (got.q, got.scale), (want.q, want.scale))


# ---- the FP8 GEMV and linear -------------------------------------------------------------------------


def _fp8_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=device) * k**-0.5
    q, s = quantize_rows_ref(w)
    return q, s.view(-1)


def check_fp8_gemv(n: int, k: int, dtype: torch.dtype, device: str, quantized_x: bool, bias: bool,
                   tiles: tuple[int, int] | None = None) -> float:
    from tokenq_kernels.fp8_triton import fp8_gemv_triton

    w, ws = _fp8_weight(n, k, device)
    x = torch.randn(1, k, dtype=dtype, device=device)
    xin = QuantizedInput(*quantize_rows_ref(x), dtype) if quantized_x else x
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    got = fp8_gemv_triton(xin, w, ws, b, tiles)
    assert got.dtype == dtype and got.shape == (1, n)
    return assert_close(f"fp8 gemv {n}x{k}", got, fp8_gemv_ref(xin, w, ws, b).float(), dtype)


def check_fp8_linear(rows: int, n: int, k: int, dtype: torch.dtype, device: str) -> float:
    """The dispatcher (the GEMV at one row, torch._scaled_mm above) against the float32 product of the same
    quantized operands; torch._scaled_mm rounds to bfloat16, so bfloat16's tolerance."""
    from tokenq_kernels.fp8 import fp8_linear

    w, ws = _fp8_weight(n, k, device)
    x = torch.randn(rows, k, dtype=dtype, device=device)
    xq, xs = quantize_rows_ref(x)
    got = fp8_linear(x, w, ws, None)
    assert got.dtype == dtype
    tol = TOLERANCE[torch.bfloat16]
    err = rel_err(got, scaled_mm_ref(xq, xs, w, ws, None, torch.float32))
    if rows == 1:  # the GEMV multiplies x unquantized
        err = rel_err(got, fp8_gemv_ref(x, w, ws, None).float())
    assert err < tol, f"fp8 linear rows={rows} {n}x{k}: rel err {err:.3g}"
    return err


# ---- the FP8 KV cache --------------------------------------------------------------------------------


def check_store_kv_fp8(T: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, device: str) -> float:
    from tokenq_kernels.kv_cache_triton import store_kv_triton

    num_blocks = -(-T // block_size) + 3
    k_cache = torch.zeros(num_blocks, block_size, hkv, d, dtype=FP8, device=device)
    v_cache = torch.zeros_like(k_cache)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.2] = -1
    k = torch.randn(T, hkv, d, dtype=dtype, device=device) * 50  # some past 448 / scale: clamped, never NaN
    v = torch.randn(T, hkv, d, dtype=dtype, device=device)
    ks = torch.rand(1, device=device) + 0.2
    vs = torch.rand(1, device=device) * 0.1 + 0.01
    store_kv_triton(k, v, k_cache, v_cache, slots, ks, vs)
    store_kv_ref(k, v, ref_k, ref_v, slots, ks, vs)
    assert not k_cache.float().isnan().any(), "store_kv fp8: NaN in the cache"
    bs = k_cache.shape[1]
    flat = lambda c: c.view(num_blocks * bs, hkv * d)  # noqa: E731
    m = assert_same_quantization("store_kv fp8 k", (flat(k_cache), ks.expand(num_blocks * bs, 1)),
                                 (flat(ref_k), ks.expand(num_blocks * bs, 1)))
    return max(m, assert_same_quantization("store_kv fp8 v", (flat(v_cache), vs.expand(num_blocks * bs, 1)),
                                           (flat(ref_v), vs.expand(num_blocks * bs, 1))))


def check_attention_fp8(kind: str, hkv: int, group: int, d: int, block_size: int, dtype: torch.dtype,
                        device: str, num_splits: int | None, tiny: bool) -> float:
    """Triton attention over an FP8 cache against the reference over the same cache (read back times its
    scales), in float32."""
    from tokenq_kernels.attention import paged_attention_ref
    from tokenq_kernels.attention_triton import paged_attention_triton

    q_lens, ctx = attention_case(kind, block_size, tiny)
    k16, v16, meta = make_step(q_lens, ctx, hkv, d, block_size, dtype, device)
    ks = torch.full((1,), 0.02, device=device)
    vs = torch.full((1,), 0.015, device=device)
    k_cache = (k16.float() / ks).clamp(-448, 448).to(FP8)
    v_cache = (v16.float() / vs).clamp(-448, 448).to(FP8)
    q = torch.randn(sum(q_lens), hkv * group, d, dtype=dtype, device=device)
    scale = 1 / math.sqrt(d)
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=num_splits, k_scale=ks, v_scale=vs)
    ref = paged_attention_ref(q.float(), k_cache, v_cache, meta, scale, k_scale=ks, v_scale=vs)
    return assert_close(f"attention fp8 kv {kind} q={q_lens} ctx={ctx} splits={num_splits}", out, ref, dtype)


# ---- everything, for the interpreter test ------------------------------------------------------------


def fp8_checks(device: str, tiny: bool) -> list[tuple[str, Callable[[], float]]]:
    dtypes = [torch.float32, torch.bfloat16]
    checks: list[tuple[str, Callable[[], float]]] = []
    for dtype in dtypes:
        t = str(dtype).removeprefix("torch.")
        if tiny:
            checks += [
                (f"fp8_quantize_rows {t}", lambda dtype=dtype: check_quantize_rows(5, 1001, dtype, device)),
                (f"fp8_rms_norm_quant {t}", lambda dtype=dtype: check_rms_norm_quant(3, 100, dtype, device, False)),
                (f"fp8_rms_norm_quant residual {t}",
                 lambda dtype=dtype: check_rms_norm_quant(4, 96, dtype, device, True)),
                (f"fp8_silu_and_mul_quant {t}", lambda dtype=dtype: check_silu_and_mul_quant(3, 700, dtype, device)),
                # Past 32,768 columns a row takes the two-pass path.
                (f"fp8_silu_and_mul_quant two-pass {t}",
                 lambda dtype=dtype: check_silu_and_mul_quant(2, 33000, dtype, device)),
                (f"fp8_gemv {t}", lambda dtype=dtype: check_fp8_gemv(40, 300, dtype, device, False, True, (16, 64))),
                (f"fp8_gemv quantized x {t}",
                 lambda dtype=dtype: check_fp8_gemv(64, 256, dtype, device, True, False, (8, 128))),
                (f"fp8_store_kv {t}", lambda dtype=dtype: check_store_kv_fp8(13, 3, 32, 4, dtype, device)),
            ]
        else:
            checks += [
                (f"fp8_quantize_rows {t}", lambda dtype=dtype: check_quantize_rows(333, 4096, dtype, device)),
                (f"fp8_quantize_rows odd {t}", lambda dtype=dtype: check_quantize_rows(17, 14337, dtype, device)),
                (f"fp8_rms_norm_quant {t}",
                 lambda dtype=dtype: check_rms_norm_quant(333, 4096, dtype, device, True)),
                (f"fp8_rms_norm_quant odd {t}",
                 lambda dtype=dtype: check_rms_norm_quant(17, 5003, dtype, device, False)),
                (f"fp8_silu_and_mul_quant {t}",
                 lambda dtype=dtype: check_silu_and_mul_quant(97, 14336, dtype, device)),
                (f"fp8_silu_and_mul_quant odd {t}",
                 lambda dtype=dtype: check_silu_and_mul_quant(5, 3001, dtype, device)),
                (f"fp8_silu_and_mul_quant 70b {t}",
                 lambda dtype=dtype: check_silu_and_mul_quant(33, 28672, dtype, device)),
                (f"fp8_silu_and_mul_quant two-pass {t}",
                 lambda dtype=dtype: check_silu_and_mul_quant(9, 40000, dtype, device)),
                (f"fp8_gemv qkv {t}", lambda dtype=dtype: check_fp8_gemv(6144, 4096, dtype, device, True, False)),
                (f"fp8_gemv down {t}", lambda dtype=dtype: check_fp8_gemv(4096, 14336, dtype, device, True, False)),
                (f"fp8_gemv odd {t}", lambda dtype=dtype: check_fp8_gemv(1001, 3001, dtype, device, False, True)),
                (f"fp8_store_kv {t}", lambda dtype=dtype: check_store_kv_fp8(777, 8, 128, 16, dtype, device)),
            ]
    gqa = [(2, 4, 64), (3, 1, 32)] if tiny else [(8, 4, 128), (8, 1, 128), (2, 8, 64)]
    for i, kind in enumerate(["decode", "mixed", "long"]):
        for j, (hkv, group, d) in enumerate(gqa):
            dtype = dtypes[i % 2] if tiny else torch.bfloat16
            # The interpreter is slow: each (kind, GQA shape) once, split and unsplit taking turns.
            for splits in [[1, 3][(i + j) % 2]] if tiny else [None, 1, 4]:
                checks.append((f"fp8_attention {kind} hkv={hkv} group={group} d={d} splits={splits}",
                               lambda kind=kind, hkv=hkv, group=group, d=d, dtype=dtype, splits=splits:
                               check_attention_fp8(kind, hkv, group, d, 16, dtype, device, splits, tiny)))
    return checks


def run_fp8_checks(device: str, tiny: bool) -> dict[str, str | None]:
    """name -> None on success, else the error text (a report: every check runs)."""
    results: dict[str, str | None] = {}
    for name, check in fp8_checks(device, tiny):
        try:
            check()
            results[name] = None
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    return results


# ---- pytest, on a GPU --------------------------------------------------------------------------------

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
CUDA = "cuda"


@pytest.mark.parametrize("name,check", fp8_checks(CUDA, tiny=False), ids=lambda v: v if isinstance(v, str) else "")
def test_fp8_kernel_against_reference(name, check):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    check()


@pytest.mark.parametrize("rows", [1, 2, 37, 512])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1024, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear(rows, n, k, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    check_fp8_linear(rows, n, k, dtype, CUDA)


def test_fp8_decode_is_graph_capturable():
    """A decode step of an FP8 model (fused norm quantization, the GEMV, _scaled_mm, the FP8 KV cache)
    replays in a CUDA graph as it runs eagerly, up to a near tie (the graph pads the batch and sizes the
    attention split for max_model_len, and FP8 requantizes each layer's activations)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from protocol.sampling import SamplingParams
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.models.random_weights import random_model, shape_config

    model, mcfg = random_model(shape_config("small"), torch.bfloat16, CUDA, seed=3, quantization="fp8")
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 129)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = {}
    for eager in (True, False):
        cfg = EngineConfig(dtype="bfloat16", device=CUDA, max_model_len=512, max_num_seqs=8, num_kv_blocks=256,
                           max_num_batched_tokens=512, enforce_eager=eager, kv_cache_dtype="fp8")
        engine = LLMEngine.from_model(model, mcfg, cfg)
        # Three decodes at once (torch._scaled_mm), then one alone (the FP8 GEMV).
        outs[eager] = engine.generate(prompts, params) + engine.generate(prompts[:1], params)
        engine.runner.release()
    for i, (e, g) in enumerate(zip(outs[True], outs[False], strict=True)):
        assert len(e.new_token_ids) == len(g.new_token_ids) == 24
        # The graph's padded batch runs _scaled_mm at another M, whose fast-accumulated partial sums round
        # otherwise (tokenq_kernels/fp8.py, FAST_ACCUM_MAX_K), so a chosen token's logprob drifts more than
        # under exact sums (docs/BENCHMARKS.md); a wrong kernel, a stale buffer or a lost scale moves it by far
        # more than this bound.
        assert_agree_until_near_tie(f"request {i}", e, g, logprob_tol=0.25)


def _teacher_forced_logits(model, mcfg, tokens: list[list[int]], kv_dtype: torch.dtype) -> torch.Tensor:
    from worker.layers.context import AttentionMetadata, set_attention_metadata

    bs = 16
    blocks = [-(-len(t) // bs) for t in tokens]
    kv = torch.zeros(mcfg.num_hidden_layers, 2, sum(blocks), bs, mcfg.num_key_value_heads, mcfg.head_dim,
                     dtype=kv_dtype, device=CUDA)
    model.bind_kv_cache(kv)
    width = max(blocks)
    table = torch.zeros(len(tokens), width, dtype=torch.int32)
    first, slots, qsl = 0, [], [0]
    for i, t in enumerate(tokens):
        table[i, : blocks[i]] = torch.arange(first, first + blocks[i])
        slots += [first * bs + p for p in range(len(t))]
        first += blocks[i]
        qsl.append(qsl[-1] + len(t))
    lens = [len(t) for t in tokens]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=CUDA), query_start_loc=torch.tensor(qsl, dtype=torch.int32,
                                                                                   device=CUDA),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=CUDA), block_tables=table.to(CUDA),
        max_query_len=max(lens), max_seq_len=max(lens), num_decodes=0, query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    ids = torch.tensor([x for t in tokens for x in t], device=CUDA)
    pos = torch.cat([torch.arange(n, device=CUDA) for n in lens])
    with torch.inference_mode(), set_attention_metadata(meta):
        return model.compute_logits(model(ids, pos)).float()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_bf16_vs_fp8_teacher_forced_logits(kv_cache_dtype):
    """The small random model in bfloat16 and the same weights quantized to FP8 while they load, over the
    same token sequences: the FP8 logits stay close (cosine) and mostly pick the same next token (a random
    model's top two logits are often near, so a few percent of the quantization noise flips some)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from worker.layers.quantization import quantization
    from worker.models.llama import LlamaForCausalLM
    from worker.models.random_weights import hf_state_dict, random_model, shape_config

    model, mcfg = random_model(shape_config("small"), torch.bfloat16, CUDA, seed=21)
    with torch.device(CUDA), quantization("fp8"):
        fp8 = LlamaForCausalLM(mcfg, torch.bfloat16)
    fp8.load_weights(hf_state_dict(model).items())
    fp8.eval()
    g = torch.Generator().manual_seed(5)
    tokens = [torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist() for n in (300, 77, 129)]
    ref = _teacher_forced_logits(model, mcfg, tokens, torch.bfloat16)
    kv = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.bfloat16
    got = _teacher_forced_logits(fp8, mcfg, tokens, kv)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert cos.min().item() > 0.98, f"cosine of FP8 to bf16 logits down to {cos.min().item():.4f}"
    assert top1 > 0.7, f"FP8 picks bf16's top token at {top1:.1%} of positions"
