"""The semantic cache's second opinion: a model on a question and each of its nearest cached
questions, which says whether the two ask the same thing. Cosine similarity alone confuses questions that
share their words but differ in one that matters (a number, a name, "not"), and cannot tell a lone near
neighbour from one among several as near; the verifier sees the cosine, how it stands against the other
candidates', and the words themselves. (The two embeddings side by side, their product and difference,
over-fit the few thousand tune pairs and were dropped.) Trained by `python -m respcache.train` on the tune
split of the Quora pairs, in the setting a lookup meets (every tune question cached, each paraphrase against
its nearest entries); the trained model ships beside this file as an ONNX graph."""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).with_name("verifier.onnx")
THRESHOLD_KEY = "threshold"  # the graph's metadata: the match probability chosen in training
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# A capitalised word not opening a sentence: a name, a place, a product.
_NAME = re.compile(r"(?<!^)(?<![.?!] )\b[A-Z][A-Za-z0-9]+")
_STOP = frozenset(
    "a an the of to in on for is are was were be been do does did i you we they he she it my your our their me "
    "what how why when where which who whom can could should would will shall may might must and or if that this "
    "these those with about as at by from into than then there so some any".split())
_NEGATIONS = frozenset({"not", "no", "never", "without", "dont", "don", "doesn", "isn", "cannot", "nt", "cant",
                        "won", "didn", "aren", "wasn"})
# Marks a question may carry or drop and still ask the same: sentence ends, commas, quotes, in Latin and CJK text.
_SENTENCE_MARKS = str.maketrans(dict.fromkeys(
    ".,?!;:'\"\u2018\u2019\u201c\u201d\u2026\u3002\uff0c\u3001\uff1f\uff01\u00bf\u00a1", " "))
_QUESTION_WORDS = ("what", "why", "how", "when", "where", "which", "who", "is", "can", "should", "do", "does",
                   "are")


def _jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def text_features(a: str, b: str) -> list[float]:
    """Surface features of a pair of texts, symmetric in a and b."""
    la, lb = a.lower(), b.lower()
    wa, wb = _WORD.findall(la), _WORD.findall(lb)
    sa, sb = set(wa), set(wb)
    ca, cb = sa - _STOP, sb - _STOP
    only_a, only_b = len(ca - cb), len(cb - ca)
    na, nb = set(_NUMBER.findall(a)), set(_NUMBER.findall(b))
    ea, eb = {x.lower() for x in _NAME.findall(a)}, {x.lower() for x in _NAME.findall(b)}
    qa = next((w for w in wa if w in _QUESTION_WORDS), "")
    qb = next((w for w in wb if w in _QUESTION_WORDS), "")
    return [
        _jaccard(sa, sb),
        _jaccard(ca, cb),
        _jaccard(set(pairwise(wa)), set(pairwise(wb))),
        min(only_a, only_b), max(only_a, only_b), float(only_a == 0 or only_b == 0),
        float(na != nb), float(bool(na) != bool(nb)), len(na ^ nb),
        len(ea ^ eb), float(ea != eb),
        min(len(wa), len(wb)) / max(len(wa), len(wb), 1),
        abs(len(wa) - len(wb)),
        float(qa == qb),
        float(bool(sa & _NEGATIONS) != bool(sb & _NEGATIONS)),
        float(la.strip() == lb.strip()),
        difflib.SequenceMatcher(None, la, lb).ratio(),
    ]


def same_words(a: str, b: str) -> bool:
    """The same words in the same order, case and sentence marks aside: "what's the capital of france" asks
    what "What's the capital of France?" asks. Every other character counts, in any script ("C++" is not
    "C#", nor one Japanese word another)."""
    return a.casefold().translate(_SENTENCE_MARKS).split() == b.casefold().translate(_SENTENCE_MARKS).split()


def features(q_vec: np.ndarray, c_vecs: np.ndarray, q_text: str, c_texts: list[str]) -> np.ndarray:
    """(n, F) features of the question against its n nearest candidates (unit vectors, nearest first)."""
    cos = c_vecs @ q_vec
    top, second = float(cos[0]), float(cos[1]) if len(cos) > 1 else 0.0
    rows = []
    for k, (s, t) in enumerate(zip(cos, c_texts, strict=True)):
        rival = max((float(x) for j, x in enumerate(cos) if j != k), default=0.0)
        context = [s, s * s, top, second, s - top, s - rival, float(k == 0), float(k)]
        rows.append(context + text_features(q_text, t))
    return np.asarray(rows, dtype=np.float32)


class Verifier:
    """Gradient-boosted trees (trained with LightGBM) on the features, run as an ONNX graph by onnxruntime on
    one thread: at the high-precision end, where the default threshold sits, trees find several times the hits
    that a small neural network did on the same features."""

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        # The match probability chosen on the tune split (policy.DEFAULT_THRESHOLD), from the graph's metadata.
        self.threshold = float(self._session.get_modelmeta().custom_metadata_map[THRESHOLD_KEY])

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> Verifier:
        return cls(path.read_bytes())

    def probability(self, x: np.ndarray) -> np.ndarray:
        """The probability that each row's pair asks the same question."""
        return self._session.run(None, {"x": np.asarray(x, dtype=np.float32)})[0][:, 0]

    def judge(self, q_vec: np.ndarray, c_vecs: np.ndarray, q_text: str, c_texts: list[str]) -> np.ndarray:
        """The match probability of the question against each of its nearest candidates: the trees', except
        that a candidate of the same words (`same_words`) is a match. The trees may score such a pair under the
        threshold, as the Quora labels taught them ("How do I overcome my inferiority complex ?" and the same
        without the space are labelled different questions), and a user who drops a question mark expects the
        hit.
        Word for word the same text is left to the trees, which refuse it: the exact cache answers it first,
        and the bench counts a hit on another pair's question of the very same words false."""
        probs = self.probability(features(q_vec, c_vecs, q_text, c_texts))
        same = [t != q_text and same_words(t, q_text) for t in c_texts]
        return np.where(same, np.float32(1.0), probs)


@lru_cache(maxsize=1)
def default_verifier() -> Verifier:
    return Verifier.load()
