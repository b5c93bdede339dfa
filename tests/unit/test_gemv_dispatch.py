"""Which matmuls go to our Triton GEMV (tokenq_kernels/gemv.py), without a GPU: one row and a large weight only,
with the tiles the H200 sweep chose; everything else stays on F.linear, but
for a CPU's float32 products, which go to oneDNN where it is faster."""

from __future__ import annotations

import pytest
import torch

from tokenq_kernels import gemv
from tokenq_kernels.gemv import GemvConfig, gemv_config, linear, linear_ref


def test_one_row_of_a_decode_sized_weight_gets_triton_tiles():
    for n, k in ((4096, 4096), (4096, 14336), (6144, 4096), (128256, 4096)):
        assert gemv_config(1, n, k) == GemvConfig(block_n=4, block_k=2048, num_stages=1)
    assert gemv_config(1, 2048, 2048).block_k == 2048  # a tensor-parallel shard
    assert gemv_config(1, 4096, 1024).block_k == 1024  # never more of K than there is


def test_several_rows_and_small_weights_stay_on_cublas():
    for rows in (2, 4, 16, 256):
        assert gemv_config(rows, 4096, 4096) is None
    assert gemv_config(1, 576, 576) is None  # SmolLM2-135M: too small to have been measured


def test_one_cpu_row_of_a_small_weight_uses_f_linear():
    x, w, b = torch.randn(1, 64), torch.randn(4096, 64), torch.randn(4096)
    with torch.inference_mode():
        assert torch.equal(linear(x, w, b), linear_ref(x, w, b))


def test_cpu_rows_and_lm_heads_go_to_onednn(monkeypatch):
    """On a CPU, several rows of any weight and one row of an LM head's weight run in oneDNN's matmul (same
    products, summed in another order); one row of a decoder layer's weight stays on F.linear, bit for bit."""
    if not gemv._ONEDNN:
        pytest.skip("torch built without oneDNN")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(gemv, "_onednn_linear", lambda *a: calls.append(a) or real(*a))
    layer, bias = torch.randn(3072, 576), torch.randn(3072)
    head = torch.randn(gemv.CPU_ONEDNN_MIN_WEIGHT // 576 + 1, 576)
    with torch.inference_mode():
        for x, w, b in ((torch.randn(32, 576), head, None), (torch.randn(1, 576), head, None),
                        (torch.randn(32, 576), layer, bias), (torch.randn(2, 5, 576), layer, bias)):
            before = len(calls)
            y = linear(x, w, b)
            assert len(calls) == before + 1 and y.shape == (*x.shape[:-1], w.shape[0])
            torch.testing.assert_close(y, linear_ref(x, w, b), rtol=1e-5, atol=1e-4)
        one_row = torch.randn(1, 576)
        assert torch.equal(linear(one_row, layer, bias), linear_ref(one_row, layer, bias))
        assert len(calls) == 4


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


def test_a_packed_cpu_weight_is_used_for_every_row_count(monkeypatch):
    """With pack_cpu_weight's copy, every float32 product on a CPU (one row too) runs on the packed weight,
    with the plain weight's results; weights that are not float32 on a CPU get no copy."""
    if not gemv._ONEDNN_PACK:
        pytest.skip("torch built without oneDNN's weight packing")
    w, b = torch.randn(3072, 576), torch.randn(3072)
    packed = gemv.pack_cpu_weight(w)
    assert packed is not None and packed.is_mkldnn
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(gemv, "_onednn_linear", lambda *a: calls.append(a[1]) or real(*a))
    with torch.inference_mode():
        for rows in (1, 5, 32, 300):
            x = torch.randn(rows, 576)
            torch.testing.assert_close(linear(x, w, b, packed), linear_ref(x, w, b), rtol=1e-5, atol=1e-4)
    assert len(calls) == 4 and all(c is packed for c in calls)
    assert gemv.pack_cpu_weight(w.bfloat16()) is None
    assert gemv.pack_cpu_weight(torch.randn(4)) is None
