"""Trains the verifier (respcache/verifier.npz) on the tune split of labelled pairs:

    python -m respcache.train --pairs ../shared/data/qqp-dev.jsonl

Training rows are what serving sees: every tune `text_b` against its nearest tune `text_a`s (a positive
only when it is the pair's own duplicate question), plus each labelled pair itself. The held-out split
is never read here."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from respcache.pairs import Pair, load_pairs, split
from respcache.verifier import WEIGHTS, Verifier, features

CANDIDATES = 4  # the lookup verifies this many nearest entries (respcache/semantic.py uses the same)


def embed_all(texts: list[str], cache: Path | None = None) -> dict[str, np.ndarray]:
    """Embeddings of `texts` by the serving embedder; `cache` (an .npz) keeps them between runs."""
    from respcache.embedder import Embedder

    known: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        data = np.load(cache, allow_pickle=False)
        known = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
    todo = sorted({t for t in texts if t not in known})
    if todo:
        embedder = Embedder.load()
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            known.update(zip(batch, embedder.embed(batch), strict=True))
        if cache is not None:
            names = list(known)
            np.savez(cache, texts=np.array(names), vectors=np.stack([known[t] for t in names]))
    return known


def nearest(matrix: np.ndarray, queries: np.ndarray, count: int = CANDIDATES) -> list[np.ndarray]:
    """Indices of each query's `count` nearest rows of `matrix`, nearest first (exact search)."""
    out = []
    for i in range(0, len(queries), 1024):
        sims = queries[i:i + 1024] @ matrix.T
        top = np.argpartition(-sims, min(count, sims.shape[1] - 1), axis=1)[:, :count]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out.extend(np.take_along_axis(top, order, axis=1))
    return out


def candidate_rows(pairs: list[Pair], vec: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of each text_b against its CANDIDATES nearest text_a, and of each pair."""
    entries = sorted({p.text_a for p in pairs})
    matrix = np.stack([vec[t] for t in entries])
    xs, ys = [], []
    for p, top in zip(pairs, nearest(matrix, np.stack([vec[p.text_b] for p in pairs])), strict=True):
        q = vec[p.text_b]
        texts = [entries[i] for i in top]
        xs.append(features(q, matrix[top], p.text_b, texts))
        ys.extend(float(p.label == 1 and t == p.text_a) for t in texts)
        xs.append(features(q, vec[p.text_a][None, :], p.text_b, [p.text_a]))
        ys.append(float(p.label))
    return np.concatenate(xs), np.asarray(ys, dtype=np.float32)


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 800, lr: float = 0.05) -> Verifier:
    """L2-regularised logistic regression by full-batch Adam on standardised features."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w = np.zeros(z.shape[1], dtype=np.float64)
    b = 0.0
    m, v = np.zeros_like(w), np.zeros_like(w)
    mb = vb = 0.0
    for t in range(1, steps + 1):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        gw = z.T @ (p - y) / len(y) + l2 * w
        gb = float((p - y).mean())
        m, v = 0.9 * m + 0.1 * gw, 0.999 * v + 0.001 * gw * gw
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        b -= lr * (mb / (1 - 0.9 ** t)) / (np.sqrt(vb / (1 - 0.999 ** t)) + 1e-8)
    return Verifier(w.astype(np.float32), b, mean.astype(np.float32), scale.astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--embeddings-cache", type=Path, default=None, help=".npz to keep embeddings in")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    tune, _ = split(load_pairs(args.pairs))
    vec = embed_all([t for p in tune for t in (p.text_a, p.text_b)], args.embeddings_cache)
    x, y = candidate_rows(tune, vec)
    verifier = fit(x, y)
    verifier.save(args.out)
    p = verifier.probability(x)
    print(f"{len(y)} rows, {int(y.sum())} positive; train accuracy {float(((p > 0.5) == (y > 0.5)).mean()):.3f}")


if __name__ == "__main__":
    main()
