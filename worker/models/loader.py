"""Builds a model from a Hugging Face safetensors directory (or, for a directory that
write_random_model_dir made, from seeded random weights)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from worker.models.config import RANDOM_INIT_KEY, ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.models.random_weights import random_model


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
    config = json.loads((Path(path) / "config.json").read_text())
    if RANDOM_INIT_KEY in config:
        return random_model(config, dtype, device, seed=int(config[RANDOM_INIT_KEY].get("seed", 0)))
    cfg = ModelConfig.from_dir(path)
    with torch.device(device):
        model = LlamaForCausalLM(cfg, dtype)
    model.load_weights(iter_safetensors(path))
    return model.eval(), cfg
