"""The gateway's in-process vector index of semantic entries: one usearch HNSW index per (tenant, scope),
since a hit must match its scope exactly and a tenant sees only its own entries. It is a copy of what
Redis holds (respcache/sync.py keeps it in step); a candidate it finds is read back from Redis before it
answers, so an index that lags can miss, never answer with an entry that is gone."""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass

import numpy as np

from respcache.embedder import DIM


def encode_vector(vec: np.ndarray) -> str:
    return base64.b64encode(vec.astype(np.float16).tobytes()).decode()


def decode_vector(raw: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw), dtype=np.float16).astype(np.float32)


@dataclass(frozen=True)
class Candidate:
    entry_id: str
    text: str
    vector: np.ndarray
    expires_at: float


def _usearch_index():
    """usearch's Index class, with onnxruntime loaded first: onnxruntime (1.24 to 1.31 seen) crashes while
    it loads once usearch's module is in the process, and the embedder loads it later; the other way
    round both work."""
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    from usearch.index import Index

    return Index


class _Scope:
    def __init__(self) -> None:
        Index = _usearch_index()  # noqa: N806 - a class
        self.index = Index(ndim=DIM, metric="ip", dtype="f16", expansion_add=64)
        self.rows: dict[int, Candidate] = {}


class VectorIndex:
    """Not thread-safe: respcache/semantic.py runs every call on its one worker thread."""

    def __init__(self) -> None:
        self._scopes: dict[tuple[str, str], _Scope] = {}
        self._where: dict[tuple[str, str], tuple[tuple[str, str], int]] = {}  # (tenant, entry id) → row
        self._next = 0

    def __len__(self) -> int:
        return len(self._where)

    def add(self, tenant: str, entry_id: str, scope: str, vector: np.ndarray, text: str,
            expires_at: float) -> None:
        if (tenant, entry_id) in self._where:
            self.remove(tenant, entry_id)
        where = (tenant, scope)
        s = self._scopes.get(where)
        if s is None:
            s = self._scopes[where] = _Scope()
        row = self._next
        self._next += 1
        s.index.add(row, vector)
        s.rows[row] = Candidate(entry_id, text, vector, expires_at)
        self._where[tenant, entry_id] = (where, row)

    def remove(self, tenant: str, entry_id: str) -> None:
        found = self._where.pop((tenant, entry_id), None)
        if found is None:
            return
        where, row = found
        s = self._scopes[where]
        s.index.remove(row)
        del s.rows[row]
        if not s.rows:
            del self._scopes[where]

    def nearest(self, tenant: str, scope: str, vector: np.ndarray, count: int, now: float) -> list[Candidate]:
        """Up to `count` entries of this tenant and scope nearest to `vector`, unexpired, nearest first."""
        s = self._scopes.get((tenant, scope))
        if s is None:
            return []
        found = s.index.search(vector, min(count, len(s.rows)))
        out = []
        for row in np.atleast_1d(found.keys):
            c = s.rows.get(int(row))
            if c is not None and c.expires_at > now:
                out.append(c)
        return out
