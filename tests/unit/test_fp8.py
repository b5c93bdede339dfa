"""FP8 on the CPU: the references' numerics, the FP8 linear method (loading, tensor-parallel sharding of the
scales, checkpoints already in FP8), the FP8 KV cache, and random FP8 models made without 16-bit weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tokenq_kernels.fp8 import (
    FP8,
    QuantizedInput,
    dequantize_rows,
    fp8_linear,
    quantize_rows_ref,
    scaled_mm,
    scaled_mm_ref,
)
from worker.layers.quantization import quantization
from worker.layers.quantization.fp8_weight import quantize_weight_rows
from worker.models.random_weights import hf_state_dict, random_model, shape_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- references ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 33), (1, 4096), (3, 5, 100)])
def test_quantize_rows_round_trip_within_half_a_code(shape):
    x = torch.randn(shape) * torch.rand(*shape[:-1], 1) * 100
    q, s = quantize_rows_ref(x)
    assert q.dtype == FP8 and s.shape == (*shape[:-1], 1)
    back = dequantize_rows(q, s)
    # e4m3: 3 mantissa bits, so rounding moves a value by at most 2^-4 of itself (subnormals: 2^-10 * scale).
    assert bool(((back - x).abs() <= x.abs() * 2**-4 + s * 2**-10 + 1e-12).all())
    assert torch.allclose(q.float().abs().amax(-1), torch.full(shape[:-1], 448.0))


def test_quantize_rows_of_zeros_and_huge_values():
    x = torch.zeros(2, 16)
    x[1, 3] = 1e30
    q, s = quantize_rows_ref(x)
    assert not q.float().isnan().any() and bool((s > 0).all())
    assert q[0].float().abs().max() == 0 and q[1, 3].float() == 448


@pytest.mark.parametrize("m,n,k", [(5, 32, 64), (1, 48, 16), (9, 40, 24)])
def test_scaled_mm_matches_its_reference(m, n, k):
    """torch._scaled_mm takes float8 with row-wise scales on the CPU too; shapes it refuses (not multiples
    of 16) take the reference."""
    xq, xs = quantize_rows_ref(torch.randn(m, k))
    wq, ws = quantize_rows_ref(torch.randn(n, k))
    bias = torch.randn(n)
    got = scaled_mm(xq, xs, wq, ws.view(-1), bias, torch.float32)
    want = scaled_mm_ref(xq, xs, wq, ws.view(-1), bias, torch.float32)
    assert rel_err(got, want) < 1e-5


def test_fp8_linear_is_close_to_the_float_product():
    x, w = torch.randn(37, 256), torch.randn(96, 256) / 16
    wq, ws = quantize_rows_ref(w)
    y = fp8_linear(x, wq, ws.view(-1), None)
    assert y.dtype == torch.float32 and y.shape == (37, 96)
    xq, xs = quantize_rows_ref(x)
    assert rel_err(y, (xq.float() * xs) @ (wq.float() * ws).T) < 1e-6  # exactly the e4m3 operands' product
    exact = x @ w.T  # and near the float one: at most 3.9% in norm over 500 seeds of these inputs
    assert ((y - exact).norm() / exact.norm()).item() < 0.05
    pre = QuantizedInput(*quantize_rows_ref(x), torch.float32)
    assert torch.equal(fp8_linear(pre, wq, ws.view(-1), None), y)  # quantized upstream: the same product


# ---- the linear method: loading and tensor-parallel sharding of the scales -------------------------------


def _tp(monkeypatch, rank: int, size: int) -> None:
    import worker.layers.linear as linear

    monkeypatch.setattr(linear, "tp_rank", lambda: rank)
    monkeypatch.setattr(linear, "tp_size", lambda: size)


@pytest.mark.parametrize("rank", [0, 1])
def test_fp8_scales_shard_with_their_weight_rows(monkeypatch, rank):
    """Column-parallel layers take the per-channel scales of their own rows; row-parallel ones split the
    weight's columns and keep every row's scale."""
    from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    _tp(monkeypatch, rank, 2)
    with quantization("fp8"):
        qkv = QKVParallelLinear(32, 8, 4, 2)
        gate_up = MergedColumnParallelLinear(32, [24, 24])
        down = RowParallelLinear(24, 32)
    parts = {}
    for sid, rows in (("q", 32), ("k", 16), ("v", 16)):
        w = torch.randn(rows, 32)
        wq, ws = quantize_rows_ref(w)
        qkv.weight.weight_loader(qkv.weight, wq, sid)
        qkv.weight_scale.weight_loader(qkv.weight_scale, ws, sid)  # [rows, 1], as compressed-tensors stores it
        parts[sid] = (wq.chunk(2)[rank], ws.view(-1).chunk(2)[rank])
    want_w = torch.cat([parts[s][0] for s in "qkv"]).view(torch.uint8)
    assert torch.equal(qkv.weight.view(torch.uint8), want_w)
    assert torch.equal(qkv.weight_scale, torch.cat([parts[s][1] for s in "qkv"]))
    for sid in (0, 1):  # online quantization of a float checkpoint: each rank's rows, quantized as they load
        w = torch.randn(24, 32)
        gate_up.weight.weight_loader(gate_up.weight, w, sid)
        mine = slice(sid * 12, sid * 12 + 12)
        assert torch.equal(gate_up.weight_scale[mine], quantize_weight_rows(w.chunk(2)[rank])[1].view(-1))
    w = torch.randn(32, 24)
    wq, ws = quantize_rows_ref(w)
    down.weight.weight_loader(down.weight, wq, None)
    down.weight_scale.weight_loader(down.weight_scale, ws, None)
    assert torch.equal(down.weight.view(torch.uint8), wq.chunk(2, 1)[rank].view(torch.uint8))
    assert torch.equal(down.weight_scale, ws.view(-1))


def test_one_scale_for_a_whole_tensor_fills_every_row():
    from worker.layers.linear import MergedColumnParallelLinear

    with quantization("fp8"):
        layer = MergedColumnParallelLinear(16, [8, 8])
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(0.5), 1)
    assert torch.equal(layer.weight_scale[8:], torch.full((8,), 0.5))


def test_unknown_quantization_names_the_choices():
    with pytest.raises(ValueError, match="fp8"):
        with quantization("int3"):
            pass


# ---- models: random FP8 weights, checkpoints in FP8 ------------------------------------------------------


def test_random_fp8_model_has_no_16_bit_linear_weights():
    model, _ = random_model(shape_config("tiny"), torch.bfloat16, "cpu", seed=1, quantization="fp8")
    linear = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert linear and all(p.dtype == FP8 for p in linear.values())
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    scales = [p for n, p in model.named_parameters() if n.endswith("weight_scale")]
    assert all(bool((s > 0).all()) for s in scales)
    assert all(p.float().abs().amax() > 0 for p in linear.values())


def _logits(model, tokens: list[int], kv_cache_dtype: str = "auto") -> torch.Tensor:
    from worker.layers.context import AttentionMetadata, set_attention_metadata

    cfg = model.cfg
    n = len(tokens)
    kv_dtype = FP8 if kv_cache_dtype == "fp8" else torch.float32
    blocks = -(-n // 16)
    model.bind_kv_cache(torch.zeros(cfg.num_hidden_layers, 2, blocks, 16, cfg.num_key_value_heads, cfg.head_dim,
                                    dtype=kv_dtype))
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens=torch.tensor([n], dtype=torch.int32),
                             block_tables=torch.arange(blocks, dtype=torch.int32)[None], max_query_len=n,
                             max_seq_len=n, num_decodes=0, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
    with torch.inference_mode(), set_attention_metadata(meta):
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n)))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """A tiny random Llama as a Hugging Face directory in float32, and its model."""
    config = shape_config("tiny")
    model, _ = random_model(config, torch.float32, "cpu", seed=7)
    path = tmp_path_factory.mktemp("float-ckpt")
    save_file({k: v.contiguous() for k, v in hf_state_dict(model).items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path, model, config


def _write_fp8_checkpoint(float_dir, out_dir, fmt: str) -> None:
    """The float checkpoint in compressed-tensors FP8_DYNAMIC (weight + weight_scale per row: the codes and
    scales online quantization of it makes) or Hugging Face fp8 (weight + weight_scale_inv per 32x32 block)
    form; the LM head and embeddings stay as they are."""
    from safetensors.torch import load_file

    from worker.models.loader import load_model

    tensors = load_file(str(float_dir / "model.safetensors"))
    out = {}
    if fmt == "compressed-tensors":
        online, _ = load_model(float_dir, torch.float32, "cpu", quantization="fp8")
        tensors = hf_state_dict(online)
    for name, t in tensors.items():
        if not name.endswith("proj.weight"):
            out[name] = t.contiguous()
        elif fmt == "compressed-tensors":
            out[name], out[f"{name}_scale"] = t.contiguous(), tensors[f"{name}_scale"][:, None].contiguous()
        else:
            n, k = t.shape
            blocks = t.view(n // 32, 32, k // 32, 32)
            scale_inv = blocks.abs().amax((1, 3)) / 448
            q = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(FP8).view(n, k)
            out[name], out[f"{name}_scale_inv"] = q, scale_inv
    save_file(out, str(out_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    if fmt == "compressed-tensors":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "type": "float", "num_bits": 8, "strategy": "channel", "dynamic": False, "symmetric": True},
                "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}},
            "ignore": ["lm_head"]}
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": [32, 32]}
    (out_dir / "config.json").write_text(json.dumps(config))


def test_online_fp8_tracks_float32(float_checkpoint):
    from worker.models.loader import load_model

    path, model, _ = float_checkpoint
    fp8, _ = load_model(path, torch.float32, "cpu", quantization="fp8")
    tokens = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = _logits(model, tokens)
    for kv in ("auto", "fp8"):
        got = _logits(fp8, tokens, kv)
        assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99


def test_compressed_tensors_checkpoint_loads_as_its_own_fp8(float_checkpoint, tmp_path):
    """Read as FP8 without being asked, the stored codes and scales kept: written from the model online
    quantization of the float checkpoint makes, it loads back as that very model."""
    from worker.models.loader import load_model

    path, _, _ = float_checkpoint
    _write_fp8_checkpoint(path, tmp_path, "compressed-tensors")
    stored, _ = load_model(tmp_path, torch.float32, "cpu")
    online, _ = load_model(path, torch.float32, "cpu", quantization="fp8")
    layer = stored.model.layers[1].mlp.down_proj
    assert layer.weight.dtype == FP8
    assert torch.equal(layer.weight_scale, online.model.layers[1].mlp.down_proj.weight_scale)
    tokens = list(range(3, 40))
    assert torch.equal(_logits(stored, tokens), _logits(online, tokens))


def test_hf_block_fp8_checkpoint_is_read_not_rejected(float_checkpoint, tmp_path):
    from worker.models.loader import load_model

    path, model, _ = float_checkpoint
    _write_fp8_checkpoint(path, tmp_path, "fp8")
    loaded, _ = load_model(tmp_path, torch.float32, "cpu")
    assert loaded.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    tokens = list(range(3, 40))
    cos = torch.nn.functional.cosine_similarity(_logits(loaded, tokens), _logits(model, tokens), dim=-1)
    assert cos.min() > 0.99


def test_checkpoint_quantization_is_checked():
    from worker.models.loader import checkpoint_quantization

    assert checkpoint_quantization({}) is None
    assert checkpoint_quantization({"quantization_config": {"quant_method": "fp8"}}) == "fp8"
    with pytest.raises(ValueError, match="num_bits"):
        checkpoint_quantization({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
            "g": {"weights": {"type": "int", "num_bits": 4}}}}})
    with pytest.raises(ValueError, match="awq"):
        checkpoint_quantization({"quantization_config": {"quant_method": "awq"}})


# ---- the FP8 KV cache ------------------------------------------------------------------------------------


def test_fp8_kv_cache_holds_twice_the_blocks_in_the_same_memory():
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    model, mcfg = random_model(shape_config("tiny"), torch.float32, "cpu", seed=2)
    blocks = {}
    for kv in ("auto", "fp8"):
        cfg = EngineConfig(dtype="bfloat16" if kv == "auto" else "float32", kv_cache_memory_gb=0.01,
                           kv_cache_dtype=kv)
        engine = LLMEngine.from_model(model, mcfg, cfg)
        assert engine.runner.kv_cache.dtype == (torch.bfloat16 if kv == "auto" else FP8)
        blocks[kv] = engine.runner.num_blocks
        engine.runner.release()
    assert blocks["fp8"] == 2 * blocks["auto"]


def test_fp8_kv_store_and_attention_references():
    """Keys and values stored in e4m3 (divided by their scales, clamped) and read back times the scales
    give nearly the attention of a float32 cache."""
    from tokenq_kernels.attention import paged_attention_ref
    from tokenq_kernels.kv_cache import store_kv_ref
    from worker.layers.context import AttentionMetadata

    T, hkv, d, bs = 21, 2, 32, 8
    k, v = torch.randn(T, hkv, d) * 3, torch.randn(T, hkv, d)
    k[0, 0, 0] = 1e4  # past e4m3's range at this scale: clamped, never NaN
    q = torch.randn(T, 4, d)
    meta = AttentionMetadata(slot_mapping=torch.arange(T), query_start_loc=torch.tensor([0, T], dtype=torch.int32),
                             seq_lens=torch.tensor([T], dtype=torch.int32),
                             block_tables=torch.arange(3, dtype=torch.int32)[None], max_query_len=T, max_seq_len=T,
                             num_decodes=0, query_start_loc_cpu=[0, T], seq_lens_cpu=[T])
    ks, vs = torch.tensor([0.05]), torch.tensor([0.01])
    kc, vc = torch.zeros(3, bs, hkv, d, dtype=FP8), torch.zeros(3, bs, hkv, d, dtype=FP8)
    store_kv_ref(k, v, kc, vc, meta.slot_mapping, ks, vs)
    assert kc[0, 0, 0, 0].float() == 448  # clamped
    # k and v are passed too, but an FP8 cache is always read back: the output sees the quantized values.
    got = paged_attention_ref(q, kc, vc, meta, d**-0.5, k, v, ks, vs)
    assert not got.isnan().any()
    # Exactly the attention of the e4m3-rounded keys and values: what is stored is what is read back.
    kq = (k / ks).clamp(-448, 448).to(FP8).float() * ks
    vq = (v / vs).clamp(-448, 448).to(FP8).float() * vs
    float_cache = [torch.zeros(3, bs, hkv, d) for _ in range(2)]
    assert rel_err(got, paged_attention_ref(q, *float_cache, meta, d**-0.5, kq, vq)) < 1e-6
    # And near the float32 attention (with the clamped key): e4m3's 3 mantissa bits cost a few percent in
    # norm (at most 5.2% over 300 seeds of these inputs).
    k[0, 0, 0] = 448 * 0.05
    exact = paged_attention_ref(q, *float_cache, meta, d**-0.5, k, v)
    assert ((got - exact).norm() / exact.norm()).item() < 0.1
