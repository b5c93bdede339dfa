"""Which matmuls go to our Triton GEMV (tokenq_kernels/gemv.py), without a GPU: one row and a large weight only,
with the tiles the H200 sweep chose; everything else, and every CPU tensor, stays on F.linear."""

from __future__ import annotations

import pytest
import torch

from tokenq_kernels import gemv
from tokenq_kernels.gemv import GemvConfig, gemv_config, linear, linear_ref


def test_one_row_of_a_decode_sized_weight_gets_triton_tiles():
    assert gemv_config(1, 4096, 4096) == GemvConfig(block_n=8, block_k=1024, num_stages=1)
    assert gemv_config(1, 4096, 14336) == GemvConfig(block_n=8, block_k=1024, num_stages=1)
    assert gemv_config(1, 6144, 4096) == GemvConfig(block_n=4, block_k=1024, num_stages=1)
    assert gemv_config(1, 128256, 4096) == GemvConfig(block_n=4, block_k=1024, num_stages=1)
    assert gemv_config(1, 2048, 2048).block_k == 1024  # a tensor-parallel shard


def test_several_rows_and_small_weights_stay_on_cublas():
    for rows in (2, 4, 16, 256):
        assert gemv_config(rows, 4096, 4096) is None
    assert gemv_config(1, 576, 576) is None  # SmolLM2-135M: too small to have been measured


def test_cpu_tensors_use_f_linear_whatever_the_shape():
    x, w, b = torch.randn(1, 64), torch.randn(4096, 64), torch.randn(4096)
    assert torch.equal(linear(x, w, b), linear_ref(x, w, b))


def test_cpu_lm_head_sized_weight_goes_to_onednn(monkeypatch):
    """An LM head's weight on a CPU runs in oneDNN's matmul (same products, summed in another order); the
    decoder layers' weights stay on F.linear, bit for bit."""
    if not gemv._ONEDNN:
        pytest.skip("torch built without oneDNN")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(gemv, "_onednn_linear", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(32, 576)
    head = torch.randn(gemv.CPU_ONEDNN_MIN_WEIGHT // 576 + 1, 576)
    with torch.inference_mode():
        y = linear(x, head)
        assert len(calls) == 1
        torch.testing.assert_close(y, linear_ref(x, head), rtol=1e-5, atol=1e-4)
        layer = torch.randn(3072, 576)
        assert torch.equal(linear(x, layer), linear_ref(x, layer)) and len(calls) == 1


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(gemv, "ENABLED", True)
    monkeypatch.setattr(gemv, "use_triton", lambda x: True)
    called = []
    monkeypatch.setattr(gemv, "gemv_triton", lambda *a: called.append(a) or torch.zeros(1, 4096))
    x, w = torch.randn(1, 1024), torch.randn(4096, 1024)
    linear(x, w)
    assert len(called) == 1
    gemv.set_gemv_enabled(False)  # monkeypatch puts ENABLED back afterwards
    assert torch.allclose(linear(x, w), linear_ref(x, w))
    assert len(called) == 1
