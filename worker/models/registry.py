"""Which class runs a checkpoint: config.json's architecture (or, where a checkpoint names none, its
model_type) -> a model class. A new architecture is one module with a class that has the CausalLM
interface, and one line here.

Classes are named as "module:Class" and imported on first use, so reading a config imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from worker.models.config import ModelConfig

# Hugging Face architecture name -> our class.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "worker.models.llama:LlamaForCausalLM",
}
# model_type -> the architecture it means, for checkpoints whose config.json names no architecture.
MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}


class CausalLM(Protocol):
    """What the engine needs of a model (an nn.Module): one forward over a flattened step, logits, the KV
    cache bound once, and weights loaded (and sharded) from Hugging Face names."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def bind_kv_cache(self, kv: torch.Tensor) -> None: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def architecture_of(model_type: str | None, architectures: list[str] | None) -> str:
    """The supported architecture a config names, or a ValueError naming what is supported."""
    names = list(architectures or ([MODEL_TYPES[model_type]] if model_type in MODEL_TYPES else []))
    for name in names:
        if name in ARCHITECTURES and model_type in MODEL_TYPES:
            return name
    raise ValueError(f"unsupported model: model_type={model_type!r}, architectures={names!r}; "
                     f"supported: {', '.join(sorted(ARCHITECTURES))}")


def model_class(cfg: ModelConfig) -> type:
    """The class that runs `cfg` (imported now)."""
    module, name = ARCHITECTURES[architecture_of(cfg.model_type, cfg.architectures)].split(":")
    return getattr(importlib.import_module(module), name)
