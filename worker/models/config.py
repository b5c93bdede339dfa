"""A model's shape and settings, read once from a Hugging Face directory (config.json, generation_config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.models.registry import architecture_of

# A config.json key that marks a directory whose weights are made at load time (seeded random values)
# instead of read from *.safetensors; see worker.models.random_weights.write_random_model_dir.
RANDOM_INIT_KEY = "tokenq_random_init"



@dataclass
class ModelConfig:
    model_type: str
    architectures: list[str]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else "rope_type" is linear or llama3
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    # The attention window of any layer that slides (None: every layer attends to the whole sequence). Our
    # attention does not slide: within one window the two agree, so max_model_len is capped to it
    # (worker/engine/tp_ranks.resolve_max_model_len).
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls.from_dict(json.loads(config_file.read_text()), gen)

    @classmethod
    def from_dict(cls, c: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        model_type = c.get("model_type")
        architectures = [architecture_of(model_type, c.get("architectures"))]
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # one function under two names
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")
        heads = c["num_attention_heads"]
        theta, scaling = _rope(c)
        if model_type == "qwen2":  # Qwen2 hard-codes bias on q/k/v and none on o_proj
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(c.get("attention_bias", False))
        window = c.get("sliding_window") if _some_layer_slides(c) else None
        eos = _ids(c.get("eos_token_id"))
        if generation_config:
            eos += [i for i in _ids(generation_config.get("eos_token_id")) if i not in eos]
        return cls(
            model_type=model_type,
            architectures=list(architectures),
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(c.get("mlp_bias", False)),
            sliding_window=window,
            eos_token_ids=eos,
            bos_token_id=c.get("bos_token_id"),
            torch_dtype=c.get("torch_dtype") or c.get("dtype"),
        )


def _some_layer_slides(c: dict[str, Any]) -> bool:
    """Whether any layer's attention is windowed, as transformers reads the config: `layer_types` where it
    is written; else Qwen2 slides only with `use_sliding_window`, and then the layers from
    `max_window_layers` on; Mistral's every layer slides once `sliding_window` is set."""
    if not c.get("sliding_window"):
        return False
    if c.get("layer_types"):
        return "sliding_attention" in c["layer_types"]
    if c.get("model_type") == "qwen2":
        first = c.get("max_window_layers", c["num_hidden_layers"])
        return bool(c.get("use_sliding_window", False)) and first < c["num_hidden_layers"]
    return True


def _ids(v: int | list[int] | None) -> list[int]:
    if v is None:
        return []
    return [v] if isinstance(v, int) else list(v)


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = dict(c.get("rope_parameters") or {})
    old = c.get("rope_scaling") or {}
    params = {**old, **params}
    theta = float(params.pop("rope_theta", c.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
        missing = {"factor", "low_freq_factor", "high_freq_factor"} - params.keys()
        if missing:
            raise ValueError(f"llama3 rope scaling lacks {sorted(missing)}")
    elif rope_type != "linear":
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")
    return theta, {"rope_type": rope_type, **params}
