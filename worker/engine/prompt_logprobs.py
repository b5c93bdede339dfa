"""Logprobs of a prompt's own tokens (completions' `echo` with `logprobs`, for perplexity): computed from
the prefill's hidden states, for the requests that ask only, as each prompt chunk runs.

Position p's logits predict token p + 1, so a chunk over positions [a, e) yields the logprobs of prompt
tokens a + 1 .. e. The rows go through the head a slice at a time: a whole chunk's logits over a large
vocabulary would be gigabytes. Like the sampler's logprobs, these are the model's raw log-softmax.

The slices are planned before the step runs: under tensor parallelism the head gathers the vocabulary
over every rank, so rank 0 sends the slices' rows with the step and each other rank runs the head on the
same rows in the same order (`run_head_on`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.outputs import TokenLogprobs
from worker.engine.scheduler import ScheduledSeq

ROWS_PER_SLICE = 256


@dataclass(frozen=True)
class PromptSlice:
    """Rows [row, row + hi - lo) of a step's hidden states: positions [lo, hi) of items[item]'s prompt."""

    item: int
    row: int
    lo: int
    hi: int


def plan_prompt_logprobs(items: list[ScheduledSeq], query_start: list[int]) -> list[PromptSlice]:
    """The head's slices for the step's requests that ask for prompt logprobs; `query_start` is the step's
    row offset of each item (items in the step's order)."""
    slices = []
    for i, item in enumerate(items):  # runs every step: the common case costs one attribute test a seq
        seq = item.seq
        if seq.sampling.prompt_logprobs is None or not seq.needs_prompt_logprobs:
            continue
        row0 = query_start[i]
        start = seq.num_computed_tokens  # position of the item's first row
        # Positions whose next token is a prompt token and whose logprob is not known yet.
        first = max(start, len(seq.prompt_logprobs))
        end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        for lo in range(first, end, ROWS_PER_SLICE):
            slices.append(PromptSlice(i, row0 + lo - start, lo, min(lo + ROWS_PER_SLICE, end)))
    return slices


def slice_rows(slices: list[PromptSlice]) -> np.ndarray:
    """The slices as [first row, end row) pairs, what the other ranks need of them."""
    return np.array([(s.row, s.row + s.hi - s.lo) for s in slices], dtype=np.int64).reshape(-1, 2)


def run_head_on(rows: np.ndarray, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Ranks other than 0: the head's share of rank 0's prompt-logprob slices (their logits stay there)."""
    for a, b in rows.tolist():
        compute_logits(hidden[a:b])


def fill_prompt_logprobs(items: list[ScheduledSeq], slices: list[PromptSlice], hidden: torch.Tensor,
                         compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Appends to each planned item's `prompt_logprobs` what its slices yield; waits for the device."""
    for s in slices:
        seq = items[s.item].seq
        top_n = seq.sampling.prompt_logprobs or 0
        logprobs = torch.log_softmax(compute_logits(hidden[s.row : s.row + s.hi - s.lo]).float(), dim=-1)
        targets = torch.tensor(seq.prompt_token_ids[s.lo + 1 : s.hi + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        vals, ids = logprobs.topk(top_n, dim=1)
        for t, lp, tv, ti in zip(targets.tolist(), chosen, vals.tolist(), ids.tolist(), strict=True):
            seq.prompt_logprobs.append(TokenLogprobs(token_id=t, logprob=lp, top=list(zip(ti, tv, strict=True))))
