"""One request inside the engine: its tokens, sampling parameters, priority and block table."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from protocol.sampling import SamplingParams
from worker.engine.outputs import TokenLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival_counter = itertools.count()
WORST_PRIORITY = 2  # priorities are the lanes' (protocol.keys.LANE_PRIORITY): 0 interactive, 1 default, 2 batch


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 1  # 0 interactive, 1 default, 2 batch: lower runs first
    arrival: float = field(default_factory=time.monotonic)
    tenant: str = "default"
    cache_salt: str = ""  # mixed into prefix hashes so tenants never share KV blocks unless they should

    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first schedule only)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    # With a step in flight, the engine appends a stand-in for the token that step is sampling, so the
    # next step can be scheduled before it is known: `pending` is its row in that step's samples, whose
    # device copy the next step reads its input id from. -1 when every token in token_ids is known.
    pending: int = -1
    # With sampling.prompt_logprobs: the logprob of each prompt token after the first, filled by the runner
    # as the prompt's prefill chunks run (a recompute after preemption does not add them twice).
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Tie-breaker for equal (priority, arrival): FIFO by submission order.
    order: int = field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and some are still to compute: its prefill must run on every prompt
        position (a prefix-cache hit would skip them, and cached blocks keep no logits)."""
        return (self.sampling.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival, self.order)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
