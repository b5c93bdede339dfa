"""What the engine hands back after each step, per request that made progress."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str  # new, final-safe text (no broken UTF-8, no possible stop-string prefix)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    # With the first output token of a request that asked for them: one per prompt token, the first None
    # (nothing comes before it to predict it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    produced_at: float = 0.0  # wall time the step that made it ended (set by the engine loop; 0: unknown)

    @property
    def urgent(self) -> bool:
        """A request's first token or its end: what a client waits on (time to first token, the finish)."""
        return self.finished or (bool(self.new_token_ids) and self.num_output_tokens == len(self.new_token_ids))


@dataclass
class FailedOutput(RequestOutput):
    """A request the engine could not run (add_request, its sampling or a step raised): finish_reason is
    "error" and `error` says why."""

    error: str = ""
