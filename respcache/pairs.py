"""Labelled question pairs (`{"text_a", "text_b", "label"}` a line) and their split into a tune part and a
held-out part that share no question: pairs linked by a common question land on the same side, so that
nothing measured on the held-out part was seen while tuning."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 30


@dataclass(frozen=True)
class Pair:
    text_a: str
    text_b: str
    label: int


def load_pairs(path: Path | str) -> list[Pair]:
    with open(path, encoding="utf-8") as f:
        return [Pair(r["text_a"], r["text_b"], int(r["label"])) for r in map(json.loads, f) if r]


def groups(pairs: list[Pair]) -> list[str]:
    """Each pair's group: the least question linked to it through shared questions (pairs that share a
    question, directly or through others, are one group)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = root(p.text_a), root(p.text_b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(p.text_a) for p in pairs]


def bucket(group: str, salt: str = "") -> int:
    """0..99 from a group's name, the same on every machine."""
    return int(hashlib.sha256((salt + group).encode()).hexdigest()[:8], 16) % 100


def split(pairs: list[Pair], held_out_percent: int = HELD_OUT_PERCENT) -> tuple[list[Pair], list[Pair]]:
    """(tune, held_out), disjoint by question; which side a group of linked pairs takes is a hash of its
    first question, so the split is the same on every machine."""
    tune, held_out = [], []
    for p, g in zip(pairs, groups(pairs), strict=True):
        (held_out if bucket(g) < held_out_percent else tune).append(p)
    return tune, held_out
