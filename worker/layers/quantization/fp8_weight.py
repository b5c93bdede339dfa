"""The scale each FP8 weight row is stored with, picked at load time: of a few candidates around
max|row| / 448, the one whose rounding error, each column's counted by the square of its input's gain, is least.

Where the e4m3 grid points fall depends on the scale, and a row's output error is dominated by the columns whose
input is strongest. The RMSNorm in front of qkv and gate/up multiplies each input channel by its weight, so those
layers count a column's error by that weight squared; layers without a known gain count every column alike.
Only the stored codes and row scales change: the FP8 kernels and what they compute stay the same.
"""

from __future__ import annotations

import torch

from tokenq_kernels.fp8 import FP8, FP8_MAX, MIN_AMAX

# Candidate scales as ratios to max|row| / 448: an octave in 16 steps (the e4m3 grid repeats at every power of
# two, so one octave holds every alignment of it) and two steps below, which clip the row's largest values.
# The plain max|row| / 448 comes first, so it stays where nothing is better.
SCALE_RATIOS = tuple(2.0 ** (k / 16) for k in (*range(16), -1, -2))
# Elements of a weight searched at a time (a bounded float32 scratch, whatever the weight's size).
_CHUNK_ELEMENTS = 1 << 24


def quantize_weight_rows(
    w: torch.Tensor, gain: torch.Tensor | None = None, ratios: tuple[float, ...] = SCALE_RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], float32 scale [N, 1]); gain [K]: the per-channel gain of the layer's input."""
    n, k = w.shape
    if gain is not None and gain.shape != (k,):
        raise ValueError(f"input gain of shape {tuple(gain.shape)} for a weight of {k} columns")
    col_weight = None if gain is None else gain.float().square()
    q = torch.empty(n, k, dtype=FP8, device=w.device)
    scale = torch.empty(n, 1, dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        end = min(n, start + rows)
        q[start:end], scale[start:end] = _best_scale(w[start:end].float(), col_weight, ratios)
    return q, scale


def _best_scale(
    w: torch.Tensor, col_weight: torch.Tensor | None, ratios: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax(-1, keepdim=True).clamp_min(MIN_AMAX)
    best_s = best_err = None
    for r in ratios:
        s = amax * r / FP8_MAX
        x = w / s
        q = (x.clamp_(-FP8_MAX, FP8_MAX) if r < 1 else x).to(FP8).float()
        d = q.sub_(w / s if r < 1 else x).square_()  # the error in units of the scale, then counted in s^2
        err = (d.sum(-1, keepdim=True) if col_weight is None else (d @ col_weight)[:, None]) * s.square()
        if best_err is None:
            best_s, best_err = s, err
        else:  # ties keep the earlier candidate
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.minimum(err, best_err)
    return (w / best_s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), best_s
