"""`tokenq models random`: a directory the whole stack serves with seeded random weights, made at load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from protocol.sampling import SamplingParams
from tokenq.model_store import is_model_dir, resolve_model
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.loader import load_model
from worker.models.random_weights import random_model, shape_config, write_random_model_dir


def test_loader_makes_the_seeded_weights(tmp_path):
    path = write_random_model_dir("tiny", tmp_path / "m", seed=3)
    assert is_model_dir(path) and resolve_model(str(path)) == ("m", path)
    loaded, cfg = load_model(path, torch.float32, "cpu")
    ref, _ = random_model(shape_config("tiny"), torch.float32, "cpu", seed=3)
    other, _ = random_model(shape_config("tiny"), torch.float32, "cpu", seed=4)
    for (name, a), (_, b), (_, c) in zip(loaded.named_parameters(), ref.named_parameters(),
                                         other.named_parameters(), strict=True):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name  # the seed in config.json is what decides the weights
    assert cfg.vocab_size == shape_config("tiny")["vocab_size"]


def test_tokenizer_covers_the_vocabulary_and_engine_streams_text(tmp_path):
    path = write_random_model_dir("tiny", tmp_path / "m")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab
    assert tok.decode([0, vocab - 1]) == f"t0 t{vocab - 1}"
    engine = LLMEngine(path, EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05))
    [out] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(out.new_token_ids) == 6
    assert out.text_delta.split() == [f"t{i}" for i in out.new_token_ids]


def test_cli_writes_the_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenq", "models", "random", "tiny", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert is_model_dir(tmp_path / "r")
    bad = subprocess.run([sys.executable, "-m", "tokenq", "models", "random", "huge", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument shape: invalid choice: 'huge'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_model_that_is_not_there_is_an_error_line(tmp_path, monkeypatch):
    """An unknown model name, or a directory without a model, ends the command with one line naming it
    (it was a KeyError's traceback)."""
    from tokenq.cli import main

    monkeypatch.setenv("TOKENQ_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as unknown:
        main(["models", "pull", "nope"])
    assert str(unknown.value.code).startswith("error: unknown model 'nope': known models are smollm2")
    with pytest.raises(SystemExit) as empty:
        main(["worker", "--model", str(tmp_path), "--redis-url", "redis://127.0.0.1:1"])
    assert str(empty.value.code) == f"error: {tmp_path} has no config.json and *.safetensors"
