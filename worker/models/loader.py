"""Builds a model from a Hugging Face safetensors directory (or, for a directory that
write_random_model_dir made, from seeded random weights).

FP8 checkpoints load as they are: the compressed-tensors "FP8_DYNAMIC" format (an e4m3 `weight` and its
`weight_scale` per output row) and Hugging Face's `fp8` format (an e4m3 `weight` and `weight_scale_inv` per
128x128 block, which is multiplied out and quantized again per row). A checkpoint's FP8 KV-cache scales
(`self_attn.k_scale`, `v_scale`) are kept; static activation scales (`input_scale`) are not used, since
activations are quantized per token at run time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenq.logs import get_logger
from tokenq_kernels.fp8 import FP8
from worker.layers.quantization import quantization as quantized
from worker.models.config import RANDOM_INIT_KEY, ModelConfig
from worker.models.random_weights import random_model
from worker.models.registry import CausalLM, model_class

log = get_logger("loader")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every *.safetensors file in path, read one at a time: the one-dimensional ones (norm
    weights, biases, scales) first, so a linear layer quantized as it loads meets the weight of the norm that
    feeds it already in place (quantization/fp8_weight.py)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for vectors in (True, False):
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if (len(st.get_slice(name).get_shape()) <= 1) == vectors:
                        yield name, st.get_tensor(name)


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The quantization a checkpoint's config.json declares: "fp8" for the formats we read, None for none."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            log.info("checkpoint's activation scheme not used: activations are quantized per token instead",
                     activation_scheme=qc.get("activation_scheme"))
        return "fp8"
    if method == "compressed-tensors":
        for name, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(f"quantization_config.config_groups.{name}.weights: only 8-bit float weights "
                                 f"(FP8) are supported, got type={w.get('type')!r} num_bits={w.get('num_bits')!r}")
        return "fp8"
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported (supported: fp8, "
                     "compressed-tensors FP8)")


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Hugging Face fp8: weight [N, K] e4m3 times scale_inv [ceil(N/bn), ceil(K/bk)] (or one scale), in float32."""
    w = weight.float()
    if scale_inv.numel() == 1:
        return w * scale_inv.float().reshape(())
    n, k = w.shape
    bn, bk = -(-n // scale_inv.shape[0]), -(-k // scale_inv.shape[1])
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w * s


def _checkpoint_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], kv_scales: dict[str, torch.Tensor], block_scaled: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors load_weights takes: KV-cache scales set aside in kv_scales, static activation scales
    dropped, and (block_scaled: Hugging Face fp8) each FP8 weight multiplied out by its weight_scale_inv,
    the two paired in whichever order they come."""
    waiting: dict[str, torch.Tensor] = {}  # weight name -> the FP8 weight or the scale_inv seen first
    for name, t in tensors:
        if name.endswith(".input_scale"):
            continue
        if name.endswith((".k_scale", ".v_scale")) and t.numel() == 1:
            kv_scales[name] = t
            continue
        if block_scaled and (name.endswith(".weight_scale_inv") or (name.endswith(".weight") and t.dtype == FP8)):
            key = name.removesuffix("_scale_inv")
            other = waiting.pop(key, None)
            if other is None:
                waiting[key] = t
            else:
                weight, scale_inv = (t, other) if t.dtype == FP8 else (other, t)
                yield key, dequantize_blocks(weight, scale_inv)
            continue
        yield name, t
    if waiting:
        raise ValueError(f"checkpoint has {next(iter(waiting))!r} in FP8 without both weight and weight_scale_inv")


def set_kv_scales(model: torch.nn.Module, kv_scales: dict[str, torch.Tensor]) -> None:
    """`model.layers.N.self_attn.k_scale` of a checkpoint -> our layer's attention buffer."""
    for name, t in kv_scales.items():
        prefix, kind = name.rsplit(".", 1)
        model.get_buffer(f"{prefix}.attn.{kind}").fill_(float(t.reshape(())))


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """quantization: "fp8" quantizes a 16/32-bit checkpoint while it loads; a checkpoint in FP8 is read as FP8
    whether or not it is asked for."""
    config = json.loads((Path(path) / "config.json").read_text())
    if RANDOM_INIT_KEY in config:
        return random_model(config, dtype, device, seed=int(config[RANDOM_INIT_KEY].get("seed", 0)),
                            quantization=quantization)
    declared = checkpoint_quantization(config)
    if declared is not None and quantization not in (None, declared):
        raise ValueError(f"the checkpoint is quantized as {declared!r}; --quantization {quantization!r} cannot "
                         "apply to it")
    cfg = ModelConfig.from_dir(path)
    with torch.device(device), quantized(declared or quantization):
        model = model_class(cfg)(cfg, dtype)
    kv_scales: dict[str, torch.Tensor] = {}
    block_scaled = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    model.load_weights(_checkpoint_tensors(iter_safetensors(path), kv_scales, block_scaled))
    set_kv_scales(model, kv_scales)
    return model.eval(), cfg
