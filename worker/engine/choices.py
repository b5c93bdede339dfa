"""A request that asks for several samples of its prompt (n > 1, or best_of): its sequences, and what it
hands out. Each choice is a sequence of its own; the first prefills the prompt, and the others start once
its prompt's KV is computed, sharing its full blocks (BlockManager.share_prompt) and computing only the
last partial block, so n choices hold about one prompt's blocks plus n tails. With best_of > n every
output is held until all sequences end; then the n with the highest logprob per token (the mean of the model's
raw logprobs of the tokens sampled) are handed out, best first, as OpenAI documents best_of: a cumulative sum,
vLLM's ranking, favours whichever sequence stopped first."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from protocol.sampling import SamplingParams
from worker.engine.outputs import RequestOutput
from worker.engine.sequence import Sequence, SequenceStatus


def choice_seed(seed: int, index: int) -> int:
    """Choice 0 keeps the request's seed (one choice samples as with n = 1); the others derive theirs from
    it, so choices differ and the whole request is reproducible."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sequence_params(sampling: SamplingParams, index: int) -> SamplingParams:
    """The parameters of the request's sequence `index`: its own seed; prompt logprobs on the first only
    (they are the same for all); the sampled tokens' logprobs always when best_of must rank sequences."""
    update: dict = {}
    if index > 0:
        if sampling.seed is not None:
            update["seed"] = choice_seed(sampling.seed, index)
        update["prompt_logprobs"] = None
    if sampling.num_sequences > sampling.n and sampling.logprobs is None:
        update["logprobs"] = 0
    return sampling.model_copy(update=update) if update else sampling


@dataclass(eq=False)
class ChoiceGroup:
    """The sequences of one request of several choices, and what they hand out."""

    request_id: str
    sampling: SamplingParams  # the client's
    sequences: list[Sequence]  # by index; the first is scheduled at once, the others once its prompt is in
    unforked: list[Sequence] = field(default_factory=list)
    running: int = 0  # sequences not finished
    held: dict[int, RequestOutput] = field(default_factory=dict)  # best_of > n: every output so far

    def __post_init__(self) -> None:
        self.unforked = self.sequences[1:]
        self.running = len(self.sequences)

    @property
    def selects(self) -> bool:
        return len(self.sequences) > self.sampling.n

    def ready_to_fork(self) -> bool:
        """The first sequence's prompt is computed (or queued on the device ahead of the next step)."""
        first = self.sequences[0]
        return first.status is SequenceStatus.RUNNING and first.num_computed_tokens >= first.num_prompt_tokens

    def collect(self, out: RequestOutput) -> list[RequestOutput]:
        """What to hand out for one of the group's outputs: the output itself (`choices_left` says how many
        others still run); with best_of > n nothing until the last sequence ends, then the n best."""
        if out.finished:
            self.running -= 1
        if not self.selects:
            out.choices_left = self.running
            return [out]
        if (held := self.held.get(out.index)) is None:
            self.held[out.index] = out
        else:
            held.extend(out)
        return [] if self.running else self._best()

    def _per_token(self, index: int) -> float:
        """A held sequence's mean logprob per sampled token (0 for one that sampled none)."""
        logprobs = self.held[index].logprobs or ()
        return sum(lp.logprob for lp in logprobs) / max(1, len(logprobs))

    def _best(self) -> list[RequestOutput]:
        n = self.sampling.n
        ranked = sorted(self.held, key=lambda i: -self._per_token(i))[:n]  # stable: ties by index
        prompt_logprobs = next((o.prompt_logprobs for o in self.held.values() if o.prompt_logprobs), None)
        best = []
        for rank, i in enumerate(ranked):
            out = self.held[i]
            out.index, out.choices_left = rank, n - 1 - rank
            out.prompt_logprobs = prompt_logprobs if rank == 0 else None
            if self.sampling.logprobs is None:  # asked for by the engine only, to rank
                out.logprobs = None
            best.append(out)
        return best
