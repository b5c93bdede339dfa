"""What an FP8 QK product (explore_fp8_attention.py's qk_fp8 variant) and an FP8 LM head would cost in
accuracy, on the CPU: perplexity of the shipped text under the default model in float32, with FP8 weights,
activations and KV cache, then the same with every query quantized to e4m3 per (token, head) before
attention reads the FP8 cache (quantized, then read back, in the torch attention path; the kernel would scale
the product instead), and with the LM head in W8A8 as the linear layers are (its weight per vocabulary row,
the hidden rows per token, both quantized and read back):

    python tests/gpu/explore_fp8_attention_accuracy.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenq import settings  # noqa: E402
from tokenq.bench import fp8_accuracy  # noqa: E402
from tokenq.engine_options import kernel_choices  # noqa: E402
from tokenq.model_store import resolve_model  # noqa: E402
from tokenq_kernels.fp8 import FP8, FP8_MAX  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.kernel_choice import select_kernels  # noqa: E402
from worker.layers import attention  # noqa: E402
from worker.models.loader import load_model  # noqa: E402

_attend = attention.paged_attention


def _attend_with_fp8_q(q, k_cache, v_cache, meta, scale, *args, **kwargs):
    if k_cache.dtype == FP8:
        qf = q.float()
        s = (qf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        q = ((qf / s).to(FP8).float() * s).to(q.dtype)
    return _attend(q, k_cache, v_cache, meta, scale, *args, **kwargs)


def _quantized(x: torch.Tensor) -> torch.Tensor:
    """x with each row through e4m3 at its own scale, and back."""
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (x / s).to(FP8).float() * s


def _fp8_head(model):
    weight = _quantized(model.lm_head.weight.float())
    return lambda hidden: _quantized(hidden.float()) @ weight.t()


def main() -> int:
    started = time.time()
    select_kernels(EngineConfig(**kernel_choices()))
    name, path = resolve_model(settings.model_name())
    ids = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(fp8_accuracy.TEXT.read_text()).ids
    base = fp8_accuracy.perplexity(load_model(path, torch.float32, "cpu")[0], ids, "auto")
    model = load_model(path, torch.float32, "cpu", quantization="fp8")[0]
    kv = fp8_accuracy.perplexity(model, ids, "fp8")
    attention.paged_attention = _attend_with_fp8_q
    try:
        kv_q = fp8_accuracy.perplexity(model, ids, "fp8")
    finally:
        attention.paged_attention = _attend
    model.compute_logits = _fp8_head(model)
    head = fp8_accuracy.perplexity(model, ids, "auto")
    kv_head = fp8_accuracy.perplexity(model, ids, "fp8")
    print(f"{name}, {len(ids)} tokens: float32 {base:.3f}; FP8 weights, activations, KV {kv:.3f} "
          f"({kv / base - 1:+.2%}); and q in e4m3 {kv_q:.3f} ({kv_q / base - 1:+.2%}); FP8 LM head with FP8 "
          f"weights and activations {head:.3f} ({head / base - 1:+.2%}), and the KV {kv_head:.3f} "
          f"({kv_head / base - 1:+.2%}); {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
