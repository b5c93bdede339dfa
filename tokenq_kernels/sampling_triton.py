"""Triton exponential-race sampling: one pass over the logits, hash-based noise, no probability tensor.

Grid (rows, vocabulary chunks) so that a small batch still fills the GPU; each program writes its best
(score, token) and a torch argmax over the few chunks picks the winner (the first chunk on ties, so the
first index wins as in torch.argmax). The noise is bit-for-bit the hash of tokenq_kernels.sampling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenq_kernels.dispatch import sm_count
from tokenq_kernels.pdl import pdl_options
from tokenq_kernels.pdl_triton import release_dependents, wait_for_inputs

_BLOCK = 1024
_MIN_CHUNK = 8192


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, inv_t_ptr, greedy_ptr, keys_ptr, best_val_ptr, best_idx_ptr,
    stride_l, vocab, chunk, num_chunks,
    BLOCK: tl.constexpr, ARGMAX_ONLY: tl.constexpr, PDL: tl.constexpr,
):
    """ARGMAX_ONLY: every row greedy, no noise to hash (inv_t, greedy and keys are not read)."""
    release_dependents(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    if not ARGMAX_ONLY:
        inv_t = tl.load(inv_t_ptr + row)
        greedy = tl.load(greedy_ptr + row) != 0
        k1 = tl.load(keys_ptr + row * 2)
        k2 = tl.load(keys_ptr + row * 2 + 1)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    best_v = tl.full([], float("-inf"), tl.float32)
    best_i = lo
    base = logits_ptr + row.to(tl.int64) * stride_l
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < hi
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if ARGMAX_ONLY:
            s = x
        else:
            h = _mix32((_mix32(cols.to(tl.int64) ^ k2) + k1) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            s = tl.where(greedy, x, x * inv_t + -tl.log(-tl.log(u)))
            s = tl.where(ok, s, float("-inf"))
        v, i = tl.max(s, 0, return_indices=True, return_indices_tie_break_left=True)
        better = v > best_v  # strictly: an earlier block keeps a tie
        best_i = tl.where(better, start + i, best_i)
        best_v = tl.where(better, v, best_v)
    out = row * num_chunks + c
    tl.store(best_val_ptr + out, best_v)
    tl.store(best_idx_ptr + out, best_i.to(tl.int64))


def _chunked_argmax(
    logits: torch.Tensor, min_chunk: int, inv_temperature: torch.Tensor | None = None,
    greedy: torch.Tensor | None = None, keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each program's best (score, token) over its chunk of a row, then the best chunk of each row."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = max(1, min(-(-2 * sm_count(logits.device) // max(B, 1)), -(-V // min_chunk)))
    chunk = triton.cdiv(triton.cdiv(V, chunks), _BLOCK) * _BLOCK
    chunks = -(-V // chunk)
    best_val = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(B, chunks, dtype=torch.int64, device=logits.device)
    if B:
        argmax_only = inv_temperature is None
        row_args = (logits, logits, logits) if argmax_only else (
            inv_temperature.float().contiguous(), greedy.to(torch.int8).contiguous(), keys.contiguous())
        pdl = pdl_options(logits)
        _gumbel_argmax_kernel[(B, chunks)](
            logits, *row_args, best_val, best_idx,
            logits.stride(0), V, chunk, chunks,
            BLOCK=_BLOCK, ARGMAX_ONLY=argmax_only, num_warps=4, **pdl,
        )
    if chunks == 1:
        return best_idx[:, 0]
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True)).squeeze(1)


def gumbel_argmax_triton(
    logits: torch.Tensor, inv_temperature: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Same contract as tokenq_kernels.sampling.gumbel_argmax_ref: token ids [B] int64."""
    return _chunked_argmax(logits, _MIN_CHUNK, inv_temperature, greedy, keys)


def argmax_triton(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=1) for rows without NaN: a chunk of _BLOCK tokens a program at small batch,
    where torch's reduction gives a whole row to one block."""
    return _chunked_argmax(logits, _BLOCK)
