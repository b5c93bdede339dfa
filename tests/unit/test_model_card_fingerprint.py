"""The card's engine fingerprint: what besides the tokenizer and template decides an answer, so that the
response cache never answers from another model's weights or numerics, and does answer after a restart."""

from __future__ import annotations

import os

from worker.models.card import SAMPLE_BYTES, engine_fingerprint

NUMERICS = {"dtype": "bfloat16", "quantization": None, "kv_cache_dtype": "auto"}


def _model(path, weights: bytes):
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 64}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_the_same_files_and_numerics_give_the_same_fingerprint(tmp_path):
    weights = os.urandom(3 * SAMPLE_BYTES)
    a, b = _model(tmp_path / "a", weights), _model(tmp_path / "b", weights)  # a copy elsewhere: the same
    assert engine_fingerprint(a, NUMERICS) == engine_fingerprint(b, dict(reversed(NUMERICS.items())))


def test_other_weights_config_or_numerics_change_it(tmp_path):
    weights = bytearray(os.urandom(3 * SAMPLE_BYTES))
    base = engine_fingerprint(_model(tmp_path / "a", bytes(weights)), NUMERICS)
    weights[len(weights) // 2] ^= 1  # a fine-tune of the same shapes: one bit in the middle
    assert engine_fingerprint(_model(tmp_path / "b", bytes(weights)), NUMERICS) != base
    c = _model(tmp_path / "c", bytes(weights))
    (c / "config.json").write_text('{"hidden_size": 65}')
    assert engine_fingerprint(c, NUMERICS) != engine_fingerprint(tmp_path / "b", NUMERICS)
    assert engine_fingerprint(tmp_path / "a", {**NUMERICS, "quantization": "fp8"}) != base
    assert engine_fingerprint(tmp_path / "a", {**NUMERICS, "kv_cache_dtype": "fp8"}) != base
