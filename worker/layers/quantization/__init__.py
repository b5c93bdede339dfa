"""Quantization methods of the linear layers (FP8 first; INT8 or INT4 would be more methods beside it).

A method is chosen once, while the model is built: layers made inside `quantization("fp8")` take that method,
which creates their parameters, writes loaded tensors into them (quantizing as they arrive) and runs their
forward. The LM head and the embeddings are not linear layers here, so they stay in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from worker.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from worker.layers.quantization.fp8 import Fp8LinearMethod

METHODS: dict[str, type[LinearMethod]] = {"fp8": Fp8LinearMethod}
KV_CACHE_DTYPES = ("auto", "fp8")

_current: LinearMethod = UnquantizedLinearMethod()


def linear_method(name: str | None) -> LinearMethod:
    if name is None or name == "none":
        return UnquantizedLinearMethod()
    if name not in METHODS:
        raise ValueError(f"unknown quantization {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]()


def current_linear_method() -> LinearMethod:
    """The method of the linear layers being built now."""
    return _current


@contextmanager
def quantization(name: str | None) -> Iterator[None]:
    """Linear layers built inside take the named method (None: unquantized)."""
    global _current
    prev, _current = _current, linear_method(name)
    try:
        yield
    finally:
        _current = prev


__all__ = ["KV_CACHE_DTYPES", "METHODS", "Fp8LinearMethod", "LinearMethod", "UnquantizedLinearMethod",
           "current_linear_method", "linear_method", "quantization"]
