"""Sampling on the device: logit bias, penalties, min_tokens, grammar masks, greedy/temperature/top-k/top-p/
min-p, seeds, logprobs.

Logprobs follow vLLM v1's default "raw_logprobs": the log-softmax of the logits as the model produced
them, before penalties, min_tokens and grammar masking and temperature. They describe the model, not the
sampler.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from protocol.sampling import SamplingParams
from tokenq_kernels.sampling import argmax_rows
from worker.engine.guided import apply_token_bitmask
from worker.engine.outputs import TokenLogprobs

# As vLLM: a temperature this small is greedy; dividing by it would overflow the logits.
GREEDY_BELOW = 1e-5


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator of its own for a seeded request, living on the device that samples. The CPU's (a
    Mersenne twister) keeps 32 bits of its seed: it gets the request's 64 mixed into 32 (`fold_seed`), so
    that seeds apart by 2**32, or -1 and 2**63 - 1, do not draw the same samples; CUDA's keeps all 64."""
    gen = torch.Generator(device=device)
    gen.manual_seed(fold_seed(seed) if gen.device.type == "cpu" else seed)
    return gen


def fold_seed(seed: int) -> int:
    """Every bit of a 64-bit seed (negative ones as two's complement) mixed into 32 (splitmix64's finaliser,
    then the halves xored)."""
    z = seed & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFF_FFFF


@dataclass
class SamplingBatch:
    """Built once per step by the runner from the sequences that sample, one entry a row."""

    params: list[SamplingParams]
    output_token_ids: list[list[int]]  # generated so far: frequency/presence penalties
    prompt_token_ids: list[list[int]]  # with the output: repetition penalty
    generators: list[torch.Generator | None]  # per request when seed is set, else None
    stop_ids_until_min: list[set[int]]  # forbidden while len(output) < min_tokens, else empty
    # Guided decoding: the rows a grammar constrains, the bitmask of their allowed tokens on the device
    # (row j of the mask for guided_rows[j]) and those rows on the device; see worker/engine/guided.py.
    guided_rows: list[int] = field(default_factory=list)
    guided_mask: Tensor | None = None
    guided_index: Tensor | None = None

    def row(self, i: int) -> SamplingBatch:
        one = SamplingBatch([self.params[i]], [self.output_token_ids[i]], [self.prompt_token_ids[i]],
                            [self.generators[i]], [self.stop_ids_until_min[i]])
        if i in self.guided_rows:
            assert self.guided_mask is not None
            j = self.guided_rows.index(i)
            one.guided_rows, one.guided_mask = [0], self.guided_mask[j : j + 1]
            one.guided_index = torch.zeros(1, dtype=torch.int64, device=self.guided_mask.device)
        return one


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why its sampling raised (its token is junk)


class PendingSamples:
    """A step's samples while the device may still be computing them. The next step reads its input ids
    from `token_ids` on the device, so the host need not wait for them before launching it; `result()`
    waits for the copy to the host that was queued right after sampling.

    With logprobs the copy carries packed float64 rows (see `_pack_logprobs`); without, the token ids."""

    def __init__(self, token_ids: Tensor, params: list[SamplingParams], packed: Tensor | None = None,
                 top_n: int = 0) -> None:
        self.token_ids = token_ids
        self._params = params
        self._top_n = top_n
        src = token_ids if packed is None else packed
        self._with_logprobs = packed is not None
        if src.device.type == "cuda":
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = src, None

    def done(self) -> bool:
        """True when the samples are on the host: `result()` would not wait."""
        return self._ready is None or self._ready.query()

    def wait(self) -> None:
        """Blocks until the samples are on the host, without reading them."""
        if self._ready is not None:
            self._ready.synchronize()

    def result(self) -> SamplerOutput:
        self.wait()
        if not self._with_logprobs:
            return SamplerOutput(self._host.tolist(), [None] * len(self._params))
        return SamplerOutput(*_unpack_logprobs(self._host.tolist(), self._params, self._top_n))


class ReadySamples(PendingSamples):
    """Samples already on the host (rows sampled one by one after a batch raised)."""

    def __init__(self, token_ids: Tensor, output: SamplerOutput) -> None:
        self.token_ids = token_ids
        self._output = output

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def result(self) -> SamplerOutput:
        return self._output


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> Tensor:
    """[len(rows), vocab] occurrence counts, from one flat host-to-device copy of the ids."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64)
    if len(ids):
        row_of = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r in rows])
        flat = torch.from_numpy(row_of * vocab + ids).to(device, non_blocking=True)
        # scatter_add_ (atomics on a GPU), not index_put_(accumulate=True), which sorts the indices.
        counts.view(-1).scatter_add_(0, flat, torch.ones(len(ids), device=device))
    return counts


def apply_penalties(logits: Tensor, batch: SamplingBatch, rows: list[int]) -> None:
    """In place on the given rows. Repetition as HF/vLLM over prompt+output; frequency/presence as OpenAI."""
    device, vocab = logits.device, logits.shape[1]
    idx = torch.tensor(rows, device=device)
    params = [batch.params[i] for i in rows]
    sub = logits[idx]
    out_counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)

    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([batch.prompt_token_ids[i] for i in rows], vocab, device) > 0
        seen |= out_counts > 0
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)

    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    logits[idx] = sub


def apply_logit_bias(logits: Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    """In place: each given row's bias added to its tokens' logits (OpenAI's logit_bias), one upload."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i in rows:
        bias = params[i].logit_bias or {}
        row_ids += [i] * len(bias)
        token_ids += bias.keys()
        biases += bias.values()
    device = logits.device
    index = torch.tensor([row_ids, token_ids], device=device)
    logits.index_put_((index[0], index[1]), torch.tensor(biases, device=device, dtype=logits.dtype),
                      accumulate=True)


def apply_min_tokens(logits: Tensor, batch: SamplingBatch) -> None:
    """Forbid eos and stop token ids on rows that have not yet produced min_tokens."""
    pairs = [(i, t) for i, ids in enumerate(batch.stop_ids_until_min) for t in ids]
    if pairs:
        rows, cols = torch.tensor(pairs, device=logits.device).unbind(1)
        logits[rows, cols] = -float("inf")


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask to -inf what top-k (0 = off) and then top-p (1 = off) cut; one sort for both."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, -float("inf"))
    probs = sorted_logits.softmax(dim=1)
    # Keep a token while the mass before it is below p: the top token always survives.
    cut = (probs.cumsum(dim=1) - probs) > top_p.unsqueeze(1)
    cut &= (top_p < 1.0).unsqueeze(1)  # float drift in cumsum must not cut anything at p = 1
    sorted_logits = sorted_logits.masked_fill(cut, -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the top one, compared in log space."""
    top = logits.max(dim=1, keepdim=True).values
    threshold = top + torch.log(min_p).unsqueeze(1)  # log(0) = -inf: min_p = 0 keeps everything
    return logits.masked_fill(logits < threshold, -float("inf"))


def sample_from_probs(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Exponential race, argmax(p / q) with q ~ Exp(1): a sample from p. Seeded rows draw their q from
    their own generator, so their token depends only on their seed and their logits."""
    q = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
        if unseeded:
            idx = torch.tensor(unseeded, device=probs.device)
            q[idx] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    # An exact 0 draw would give inf (or nan on a masked token).
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=1)


class Sampler:
    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Samples and waits for the result on the host."""
        return self.sample(logits, batch).result()

    def sample(self, logits: Tensor, batch: SamplingBatch) -> PendingSamples:
        """Queues the sampling kernels and the copy of their result to the host; does not wait. When the
        batch raises on the host, its rows are sampled one by one, so that a request whose parameters
        break sampling fails alone (SamplerOutput.errors) and the rest of the batch goes on."""
        try:
            return self._sample_batch(logits, batch)
        except Exception:  # noqa: BLE001 - which row raised is found below, and reported per row
            return self._sample_rows_apart(logits, batch)

    def _sample_rows_apart(self, logits: Tensor, batch: SamplingBatch) -> ReadySamples:
        token_ids: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        errors: dict[int, str] = {}
        for i in range(len(batch.params)):
            try:
                out = self._sample_batch(logits[i : i + 1], batch.row(i)).result()
                token_ids.append(out.token_ids[0])
                logprobs.append(out.logprobs[0])
            except Exception as e:  # noqa: BLE001 - this request fails with the reason; others go on
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                token_ids.append(0)  # a valid id for the step already scheduled; the engine drops it
                logprobs.append(None)
        tokens = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
        return ReadySamples(tokens, SamplerOutput(token_ids, logprobs, errors))

    def _sample_batch(self, logits: Tensor, batch: SamplingBatch) -> PendingSamples:
        params = batch.params
        want_logprobs = any(p.logprobs is not None for p in params)
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        masking = any(batch.stop_ids_until_min)
        random_rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]

        if not (want_logprobs or penalized or biased or masking or random_rows or batch.guided_rows):
            return PendingSamples(argmax_rows(logits), params)  # the same index in any dtype

        logits = logits.to(torch.float32, copy=True)  # the runner's logits stay untouched
        raw_logprobs = torch.log_softmax(logits, dim=1) if want_logprobs else None
        if biased:  # before the penalties, as vLLM
            apply_logit_bias(logits, params, biased)
        if penalized:
            apply_penalties(logits, batch, penalized)
        if masking:
            apply_min_tokens(logits, batch)
        if batch.guided_rows:
            assert batch.guided_mask is not None and batch.guided_index is not None
            apply_token_bitmask(logits, batch.guided_index, batch.guided_mask)

        tokens = argmax_rows(logits)  # greedy rows: exactly torch.argmax, as HF greedy search
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            tokens[idx] = self._sample(logits[idx], batch, random_rows)

        if raw_logprobs is None:
            return PendingSamples(tokens, params)
        top_n = max(p.logprobs or 0 for p in params)
        return PendingSamples(tokens, params, _pack_logprobs(raw_logprobs, tokens, top_n), top_n)

    @staticmethod
    def _sample(sub: Tensor, batch: SamplingBatch, rows: list[int]) -> Tensor:
        """Temperature, min-p, top-k, top-p, then a draw, on the rows that do not sample greedily: vLLM v1's
        order (min-p on the tempered distribution, before the other cuts; transformers applies it last)."""
        device = sub.device
        params = [batch.params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device, dtype=sub.dtype)
        sub = sub / temperature.unsqueeze(1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device, dtype=sub.dtype)
            sub = apply_min_p(sub, min_p)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=sub.dtype)
            sub = apply_top_k_top_p(sub, top_k, top_p)
        return sample_from_probs(sub.softmax(dim=1), [batch.generators[i] for i in rows])


def _pack_logprobs(logprobs: Tensor, tokens: Tensor, top_n: int) -> Tensor:
    """One [n, 2 + 2 top_n] float64 tensor per step, so one copy to the host carries every row: the
    token, its logprob, then the widest top-n in the batch (values, then ids). float64 holds every token
    id exactly."""
    vals, ids = logprobs.topk(top_n, dim=1)  # sorted, best first; top_n = 0 gives empty rows
    sampled = logprobs.gather(1, tokens.unsqueeze(1))
    return torch.cat([t.double() for t in (tokens.unsqueeze(1), sampled, vals, ids)], dim=1)


def _unpack_logprobs(
    rows: list[list[float]], params: list[SamplingParams], top_n: int
) -> tuple[list[int], list[TokenLogprobs | None]]:
    token_ids = [int(r[0]) for r in rows]
    out: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        row, k = rows[i], p.logprobs
        top = [(int(t), lp) for t, lp in zip(row[2 + top_n : 2 + top_n + k], row[2 : 2 + k], strict=True)]
        out.append(TokenLogprobs(token_id=token_ids[i], logprob=row[1], top=top))
    return token_ids, out
