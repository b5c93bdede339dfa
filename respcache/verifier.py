"""The semantic cache's second opinion: a logistic regression on a question and its nearest cached
question, which says whether both ask the same thing. Cosine similarity alone confuses questions that
share their words but differ in one that matters (a number, a name, "not"); the verifier sees the two
embeddings side by side (their product and difference) and the words themselves. Trained by
`python -m respcache.train` on the tune split of the Quora pairs; its weights ship beside this file."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).with_name("verifier.npz")
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NEGATIONS = frozenset({"not", "no", "never", "without", "dont", "don", "doesn", "isn", "can't", "cannot", "nt"})
_QUESTION_WORDS = ("what", "why", "how", "when", "where", "which", "who", "is", "can", "should", "do", "does")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _first_question_word(words: list[str]) -> str:
    return next((w for w in words if w in _QUESTION_WORDS), "")


def text_features(a: str, b: str) -> list[float]:
    """Surface features of a pair of texts, symmetric in a and b."""
    wa, wb = _words(a), _words(b)
    sa, sb = set(wa), set(wb)
    union = sa | sb
    jaccard = len(sa & sb) / len(union) if union else 1.0
    la, lb = max(len(wa), 1), max(len(wb), 1)
    na, nb = set(_NUMBER.findall(a)), set(_NUMBER.findall(b))
    return [
        jaccard,
        min(la, lb) / max(la, lb),
        float(na != nb),
        float(bool(sa & _NEGATIONS) != bool(sb & _NEGATIONS)),
        float(_first_question_word(wa) == _first_question_word(wb)),
        len(sa ^ sb) / (la + lb),
        float(a.strip().lower() == b.strip().lower()),
    ]


def features(q_vec: np.ndarray, c_vecs: np.ndarray, q_text: str, c_texts: list[str]) -> np.ndarray:
    """(n, F) features of the question against n candidates (unit vectors)."""
    cos = c_vecs @ q_vec
    rows = [np.concatenate([q_vec * c, np.abs(q_vec - c), [s, s * s], text_features(q_text, t)])
            for c, s, t in zip(c_vecs, cos, c_texts, strict=True)]
    return np.asarray(rows, dtype=np.float32)


class Verifier:
    def __init__(self, weights: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> None:
        self.weights, self.bias, self.mean, self.scale = weights, bias, mean, scale

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> Verifier:
        data = np.load(path)
        return cls(data["weights"], float(data["bias"]), data["mean"], data["scale"])

    def save(self, path: Path = WEIGHTS) -> None:
        np.savez_compressed(path, weights=self.weights.astype(np.float32), bias=np.float32(self.bias),
                            mean=self.mean.astype(np.float32), scale=self.scale.astype(np.float32))

    def probability(self, x: np.ndarray) -> np.ndarray:
        """The probability that each row's pair asks the same question."""
        z = ((x - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))


@lru_cache(maxsize=1)
def default_verifier() -> Verifier:
    return Verifier.load()
