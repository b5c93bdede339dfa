"""The load-time choice of each FP8 weight row's scale (worker/layers/quantization/fp8_weight.py): never worse
than max|row| / 448 in the error it weighs, the same codes as the plain rule when that is the only candidate,
and wired to the norm in front of qkv and gate/up when a model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tokenq_kernels.fp8 import FP8, dequantize_rows, quantize_rows_ref
from worker.layers.quantization.fp8_weight import quantize_weight_rows


def weighted_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    d = (dequantize_rows(q, s) - w).square()
    return (d if gain is None else d * gain.square()).sum(-1)


def test_one_candidate_is_the_plain_rule():
    w = torch.randn(37, 300) * torch.rand(37, 1) * 10
    q, s = quantize_weight_rows(w, torch.rand(300), ratios=(1.0,))
    rq, rs = quantize_rows_ref(w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.parametrize("with_gain", [False, True])
def test_the_chosen_scale_is_never_worse_than_the_plain_one(with_gain):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen)
    gain = torch.rand(256, generator=gen) ** 4 * 20 if with_gain else None
    q, s = quantize_weight_rows(w, gain)
    assert q.dtype == FP8 and s.shape == (64, 1)
    got, plain = weighted_error(w, q, s, gain), weighted_error(w, *quantize_rows_ref(w), gain)
    assert bool((got <= plain).all())
    assert got.sum() < 0.9 * plain.sum()  # and it finds better scales for most rows


def test_a_strong_input_channel_is_rounded_more_closely():
    """Its weight's gain makes a column's error count: the search trades the other columns' error for it."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(512, 64, generator=gen)
    gain = torch.ones(64)
    gain[7] = 30.0
    err_col = lambda q, s: (dequantize_rows(q, s) - w)[:, 7].abs().mean()  # noqa: E731
    assert err_col(*quantize_weight_rows(w, gain)) < 0.5 * err_col(*quantize_weight_rows(w))


def test_a_gain_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="gain"):
        quantize_weight_rows(torch.randn(4, 8), torch.ones(9))


def test_loading_weighs_qkv_and_gate_up_by_the_norm_in_front(tmp_path):
    """A checkpoint whose norm weights come after the linears in the file still reaches each linear first
    (one-dimensional tensors load first), and the rows are those quantize_weight_rows makes with that gain;
    the layers after attention and the activation have no gain."""
    from worker.models.loader import load_model
    from worker.models.random_weights import hf_state_dict, random_model, shape_config

    config = shape_config("tiny")
    model, _ = random_model(config, torch.float32, "cpu", seed=11)
    tensors = {k: v.contiguous() for k, v in hf_state_dict(model).items()}
    layer = model.model.layers[0]
    layer.post_attention_layernorm.weight.data[:5] = 40.0  # a few strong channels, as real norms have
    tensors["model.layers.0.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.clone()
    ordered = dict(sorted(tensors.items(), key=lambda kv: "norm" in kv[0]))  # norms last in the file
    save_file(ordered, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    fp8, _ = load_model(tmp_path, torch.float32, "cpu", quantization="fp8")
    got = fp8.model.layers[0]
    gate_up = layer.mlp.gate_up_proj.weight
    want_q, want_s = quantize_weight_rows(gate_up, layer.post_attention_layernorm.weight)
    assert torch.equal(got.mlp.gate_up_proj.weight.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got.mlp.gate_up_proj.weight_scale, want_s.view(-1))
    assert not torch.equal(want_s, quantize_weight_rows(gate_up)[1])  # the gain changed the choice
    want_q, _ = quantize_weight_rows(layer.self_attn.qkv_proj.weight, layer.input_layernorm.weight)
    assert torch.equal(got.self_attn.qkv_proj.weight.view(torch.uint8), want_q.view(torch.uint8))
    assert got.mlp.down_proj.input_gain is None and got.self_attn.o_proj.input_gain is None
    want_q, _ = quantize_weight_rows(layer.mlp.down_proj.weight)
    assert torch.equal(got.mlp.down_proj.weight.view(torch.uint8), want_q.view(torch.uint8))
