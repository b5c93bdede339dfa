"""Llama-family models with random weights, made directly on the device from a shape, and the same
weights seen by Hugging Face transformers (for peers and correctness checks). No disk involved.

Speed does not depend on the weights' values, so performance work uses named shapes (Llama-3-8B...).
The init keeps activations and logits of order one at any depth (embedding ~ N(0, 1), each matrix
~ N(0, 1/fan_in)), so greedy tokens are decided by clear margins, not by rounding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from tokenq_kernels.fp8 import FP8
from worker.engine.distributed import single_rank, tp_size
from worker.layers.quantization import quantization as quantized
from worker.models.config import RANDOM_INIT_KEY, ModelConfig
from worker.models.llama import LlamaForCausalLM

_LLAMA3_ROPE = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}

# Hugging Face config.json fields of each named shape (model_type llama).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, **_LLAMA3_ROPE),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, **_LLAMA3_ROPE),
    # Llama-shaped but small: GPU correctness tests (head_dim 128 and GQA as the real thing).
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, **_LLAMA3_ROPE),
    # CPU smoke tests: seconds, not minutes.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, **{**_LLAMA3_ROPE, "max_position_embeddings": 4096}),
}


def shape_config(shape: str, **overrides: Any) -> dict[str, Any]:
    """A Hugging Face style config dict of a named shape."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
            **SHAPES[shape], **overrides}


# Rows of a random FP8 weight made at a time in float32 (a bounded scratch, whatever the model's size).
_FP8_CHUNK_ELEMENTS = 1 << 26


@torch.no_grad()
def random_model(config: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
                 seed: int = 0, quantization: str | None = None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Our model with random weights, allocated and initialised on the device in `dtype`. With
    quantization="fp8" the linear layers' weights are made in FP8 directly, a few rows at a time, so a model
    whose 16-bit weights would not fit the device (Llama-3-70B on one H200) never exists in 16 bits. Under
    tensor parallelism each weight is drawn whole (the same values as on one rank) and this rank's shard
    kept."""
    cfg = ModelConfig.from_dict(config)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if tp_size() > 1:
        return _random_sharded(cfg, dtype, device, gen, quantization), cfg
    with torch.device(device), quantized(quantization):
        model = LlamaForCausalLM(cfg, dtype)
    for name, p in model.named_parameters():
        if p.dtype == FP8 or getattr(p, "optional_in_checkpoint", False):
            continue  # made with their FP8 weight, below
        _init(name, p, gen)
    for layer in model.modules():
        if getattr(layer, "quant_method", None) is not None and layer.weight.dtype == FP8:
            _random_fp8_weight(layer, gen)
    return model.eval(), cfg


def _random_sharded(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
                    quantization: str | None) -> LlamaForCausalLM:
    """This rank's shard of the weights one rank would draw: each drawn whole, in the same order, and cut by
    the layers' weight loaders (which quantize it, for FP8)."""
    with torch.device("meta"), single_rank():
        whole = LlamaForCausalLM(cfg, dtype)
    with torch.device(device), quantized(quantization):
        model = LlamaForCausalLM(cfg, dtype)

    def drawn():
        for name, p in whole.named_parameters():
            if getattr(p, "optional_in_checkpoint", False):
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            _init(name, t, gen)
            yield name, t

    model.load_weights(hf_names(cfg, drawn()))
    return model.eval()


def _init(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    if name.endswith("norm.weight"):
        p.uniform_(0.8, 1.2, generator=gen)  # not all ones, so a mixed-up norm shows in comparisons
    elif name.endswith(".bias"):
        p.normal_(0.0, 0.02, generator=gen)
    elif "embed_tokens" in name:
        p.normal_(0.0, 1.0, generator=gen)
    else:
        p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)


def _random_fp8_weight(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """N(0, 1/fan_in) rows made in float32 chunk by chunk and quantized into the layer as a checkpoint's are."""
    n, k = layer.weight.shape
    rows = max(1, _FP8_CHUNK_ELEMENTS // k)
    for start in range(0, n, rows):
        chunk = torch.empty(min(rows, n - start), k, device=layer.weight.device).normal_(0.0, k**-0.5, generator=gen)
        layer.quant_method.load(layer, layer.weight, start, chunk)


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names, as views: the fused q/k/v and gate/up rows are contiguous
    slices, so nothing is copied."""
    out = dict(hf_names(model.cfg, ((n, p.detach()) for n, p in model.named_parameters())))
    if model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_names(cfg: ModelConfig, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole (one-rank) tensors under our fused names -> the same under Hugging Face's names (views)."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    for name, t in named:
        if ".qkv_proj." in name:
            for part, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                yield name.replace("qkv_proj", part), t[lo:hi]
        elif ".gate_up_proj." in name:
            yield name.replace("gate_up_proj", "gate_proj"), t[:inter]
            yield name.replace("gate_up_proj", "up_proj"), t[inter:]
        else:
            yield name, t


def hf_peer(model: LlamaForCausalLM, config: dict[str, Any], attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM over the very same tensors (no second copy of the weights)."""
    import transformers

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.requires_grad_(False)
    hf.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    # Buffers that are not in a state dict (rotary inverse frequencies) are rebuilt on the device.
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    if config.get("tie_word_embeddings"):
        hf.tie_weights()
    hf.config.dtype = dtype
    return hf.eval()


def write_random_model_dir(shape: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A model directory the whole stack can serve (worker, gateway, `tokenq up`) without any weights on
    disk: config.json of the shape, marked so the loader makes seeded random weights on the device, and a
    synthetic word-level tokenizer of exactly the shape's vocabulary (token i reads as `t{i}`), so any
    sampled id detokenizes to visible text. Why: GPU machines without a model hub still run the served
    benchmarks on a Llama-3-8B-sized model, and 16 GB of weights never need to travel."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = shape_config(shape, **{RANDOM_INIT_KEY: {"seed": seed, "shape": shape}})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return out
