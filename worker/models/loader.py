"""Builds a model from a Hugging Face safetensors directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every *.safetensors file in path, read one at a time."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[LlamaForCausalLM, ModelConfig]:
    cfg = ModelConfig.from_dir(path)
    with torch.device(device):
        model = LlamaForCausalLM(cfg, dtype)
    model.load_weights(iter_safetensors(path))
    return model.eval(), cfg
