"""Token sampling on the device without host syncs: greedy, temperature, top-k, top-p, min-p, seeds.

A draw is the exponential race argmax(p / E) with E ~ Exp(1), taken in log space as
argmax(logits / T - log E): no softmax, no multinomial, one pass over the logits. Greedy rows
(temperature below GREEDY_BELOW) take exactly argmax(logits), ties to the first index as torch.argmax.

The uniforms behind E come from a counter-based hash of (seed, step, token id), computed the same way by
the torch reference and the Triton kernel: a seeded row's token depends only on its seed, its step and
its logits, never on its neighbours in the batch nor on the device it ran on. Rows without a seed get a
fresh one from torch's generator on the device (so torch.manual_seed still makes runs repeatable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenq_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    from tokenq_kernels.sampling_triton import argmax_triton, gumbel_argmax_triton

# As vLLM: a temperature this small is greedy; dividing by it would overflow the logits.
GREEDY_BELOW = 1e-5
_MASK32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2**32.

    int64 with a mask rather than uint32, because torch lacks uint32 arithmetic; products wrap alike in
    torch and Triton, and the mask keeps the low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """Two 32-bit keys per row, [B, 2] int64, from a 63-bit seed and the row's step (tokens generated)."""
    k1 = mix32(mix32((seeds & _MASK32) ^ 0x9E3779B9) ^ (seeds >> 32))
    k2 = mix32(k1 ^ mix32((steps & _MASK32) ^ 0x85EBCA6B))
    return torch.stack((k1, k2), dim=1)


def gumbel_noise_ref(keys: Tensor, vocab: int) -> Tensor:
    """-log(E) with E ~ Exp(1) for every (row, token): [B, V] float32."""
    v = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = mix32((mix32(v[None, :] ^ keys[:, 1:2]) + keys[:, 0:1]) & _MASK32)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


def gumbel_argmax_ref(logits: Tensor, inv_temperature: Tensor, greedy: Tensor, keys: Tensor) -> Tensor:
    scores = logits.float() * inv_temperature[:, None] + gumbel_noise_ref(keys, logits.shape[1])
    scores = torch.where(greedy[:, None], logits.float(), scores)
    return scores.argmax(dim=1)


def argmax_rows(logits: Tensor) -> Tensor:
    """torch.argmax(logits, dim=1), the first index on ties; on CUDA a kernel that spreads a row over the GPU
    (a row whose logits hold NaN may get another index than torch's, which takes the first NaN)."""
    if use_triton(logits) and logits.dim() == 2:
        return argmax_triton(logits)
    return logits.argmax(dim=1)


def truncate(
    logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, min_p: Tensor | None
) -> Tensor:
    """Mask to -inf what top-k (<= 0: off), then top-p (1: off), then min-p (0: off) cut; one sort at most."""
    if top_k is not None or top_p is not None:
        vocab = logits.shape[1]
        sorted_logits, order = logits.sort(dim=1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, vocab)[:, None]
            sorted_logits = sorted_logits.masked_fill(ranks >= k, -float("inf"))
        if top_p is not None:
            probs = sorted_logits.softmax(dim=1)
            # Keep a token while the mass before it is below p: the top token always survives.
            cut = (probs.cumsum(dim=1) - probs) > top_p[:, None]
            cut &= (top_p < 1.0)[:, None]  # float drift in cumsum must not cut anything at p = 1
            sorted_logits = sorted_logits.masked_fill(cut, -float("inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if min_p is not None:
        threshold = logits.max(dim=1, keepdim=True).values + torch.log(min_p)[:, None]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    return logits


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor | None = None,
    top_p: Tensor | None = None,
    min_p: Tensor | None = None,
    seeds: Tensor | None = None,
    steps: Tensor | None = None,
) -> Tensor:
    """logits [B, V] float32 -> token ids [B] int64, on the logits' device, with no host sync.

    Per row: temperature [B] float32; top_k [B] int (0 = off), top_p [B] float32 (1 = off), min_p [B]
    float32 (0 = off), each None when no row uses it (the caller knows that on the host, and None saves
    the sort); seeds [B] int64 (< 0: unseeded) and steps [B] int64 (tokens the row has generated so far).
    """
    B = logits.shape[0]
    greedy = temperature < GREEDY_BELOW
    inv_t = torch.where(greedy, 1.0, 1.0 / temperature.clamp_min(GREEDY_BELOW)).float()
    if top_k is not None or top_p is not None or min_p is not None:
        # Greedy rows skip truncation, so that ties keep torch.argmax's first index.
        top_k = None if top_k is None else torch.where(greedy, 0, top_k)
        top_p = None if top_p is None else torch.where(greedy, 1.0, top_p)
        min_p = None if min_p is None else torch.where(greedy, 0.0, min_p)
        logits = truncate(logits.float() * inv_t[:, None], top_k, top_p, min_p)
        inv_t = torch.ones_like(inv_t)
    fresh = torch.randint(0, 2**62, (B,), device=logits.device)
    seeds = fresh if seeds is None else torch.where(seeds >= 0, seeds, fresh)
    steps = torch.zeros(B, dtype=torch.int64, device=logits.device) if steps is None else steps
    keys = row_keys(seeds.long(), steps.long())
    if use_triton(logits):
        return gumbel_argmax_triton(logits, inv_t, greedy, keys)
    return gumbel_argmax_ref(logits, inv_t, greedy, keys)
