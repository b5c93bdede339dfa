"""A CPU float32 model's linear weights packed in oneDNN's layout after loading (worker/models/cpu_packing.py):
every linear and the LM head take them, their products match the plain weights', and the budget holds."""

from __future__ import annotations

import pytest
import torch

from tokenq_kernels import gemv
from worker.layers.embedding import ParallelLMHead
from worker.layers.linear import _Linear
from worker.models import cpu_packing
from worker.models.cpu_packing import pack_cpu_weights
from worker.models.random_weights import random_model, shape_config

pytestmark = pytest.mark.skipif(not gemv._ONEDNN_PACK, reason="torch built without oneDNN's weight packing")


def _packable(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (_Linear, ParallelLMHead))]


def test_every_linear_and_the_lm_head_packs_and_computes_the_same_products():
    model, cfg = random_model(shape_config("tiny"), torch.float32, "cpu", seed=3)
    layers = _packable(model)
    assert pack_cpu_weights(model) == sum(m.weight.numel() * 4 for m in layers)
    assert all(m.cpu_packed is not None and m.cpu_packed.is_mkldnn for m in layers)
    with torch.inference_mode():
        for m in layers:
            for rows in (1, 7, 300):
                x = torch.randn(rows, m.weight.shape[1])
                packed = m(x)
                saved, m.cpu_packed = m.cpu_packed, None
                plain = m(x)
                m.cpu_packed = saved
                torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)


def test_nothing_packs_past_the_budget_or_in_other_dtypes(monkeypatch):
    model, _ = random_model(shape_config("tiny"), torch.float32, "cpu", seed=3)
    monkeypatch.setattr(cpu_packing, "PACK_BUDGET_BYTES", 1024)
    assert pack_cpu_weights(model) == 0
    assert all(m.cpu_packed is None for m in _packable(model))
    monkeypatch.undo()
    bf16, _ = random_model(shape_config("tiny"), torch.bfloat16, "cpu", seed=3)
    assert pack_cpu_weights(bf16) == 0
    fp8, _ = random_model(shape_config("tiny"), torch.float32, "cpu", seed=3, quantization="fp8")
    packed = pack_cpu_weights(fp8)  # only the LM head stays in float32 there
    assert packed == sum(m.weight.numel() * 4 for m in _packable(fp8) if m.weight.dtype == torch.float32)
    assert all(m.cpu_packed is None for m in _packable(fp8) if m.weight.dtype != torch.float32)
