"""Logprobs of a prompt's own tokens (completions' `echo` with `logprobs`, for perplexity): computed from
the prefill's hidden states, for the requests that ask only, as each prompt chunk runs.

Position p's logits predict token p + 1, so a chunk over positions [a, e) yields the logprobs of prompt
tokens a + 1 .. e. The rows go through the head a slice at a time: a whole chunk's logits over a large
vocabulary would be gigabytes. Like the sampler's logprobs, these are the model's raw log-softmax."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.outputs import TokenLogprobs
from worker.engine.scheduler import ScheduledSeq

ROWS_PER_SLICE = 256


def wants_prompt_logprobs(items: list[ScheduledSeq]) -> bool:
    return any(item.seq.needs_prompt_logprobs for item in items)


def fill_prompt_logprobs(items: list[ScheduledSeq], query_start: list[int], hidden: torch.Tensor,
                         compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Appends to each scheduled seq's `prompt_logprobs` what this step's rows of it yield. `query_start`
    is the step's row offset of each item (items in the step's order); waits for the device."""
    for item, row0 in zip(items, query_start, strict=False):
        seq = item.seq
        if not seq.needs_prompt_logprobs:
            continue
        start = seq.num_computed_tokens  # position of the item's first row
        # Positions whose next token is a prompt token and whose logprob is not known yet.
        first = max(start, len(seq.prompt_logprobs))
        end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        top_n = seq.sampling.prompt_logprobs or 0
        for lo in range(first, end, ROWS_PER_SLICE):
            hi = min(lo + ROWS_PER_SLICE, end)
            rows = hidden[row0 + lo - start : row0 + hi - start]
            logprobs = torch.log_softmax(compute_logits(rows), dim=-1)
            targets = torch.tensor(seq.prompt_token_ids[lo + 1 : hi + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            vals, ids = logprobs.topk(top_n, dim=1)
            for t, lp, tv, ti in zip(targets.tolist(), chosen, vals.tolist(), ids.tolist(), strict=True):
                seq.prompt_logprobs.append(TokenLogprobs(token_id=t, logprob=lp,
                                                         top=list(zip(ti, tv, strict=True))))
