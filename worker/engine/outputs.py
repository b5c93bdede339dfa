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
    index: int = 0  # the choice this output is of (a request with n > 1 has n)
    stop_reason: str | int | None = None  # with finish_reason "stop": the stop string or token id (None: EOS)
    choices_left: int = 0  # once finished: the request's other choices still running

    @property
    def request_finished(self) -> bool:
        """The request's last output: this choice finished and no other runs."""
        return self.finished and self.choices_left == 0

    def extend(self, later: RequestOutput) -> None:
        """Adds a later output of the same choice: one output for the whole of it (offline use, best_of)."""
        self.new_token_ids.extend(later.new_token_ids)
        self.text_delta += later.text_delta
        if later.logprobs:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished, self.finish_reason, self.stop_reason = later.finished, later.finish_reason, later.stop_reason
        self.num_prompt_tokens = max(self.num_prompt_tokens, later.num_prompt_tokens)
        self.num_output_tokens = max(self.num_output_tokens, later.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, later.num_cached_tokens)

    @property
    def urgent(self) -> bool:
        """A request's first token or its end: what a client waits on (time to first token, the finish)."""
        return self.finished or (bool(self.new_token_ids) and self.num_output_tokens == len(self.new_token_ids))


@dataclass
class FailedOutput(RequestOutput):
    """A request the engine could not run (add_request, its sampling or a step raised): finish_reason is
    "error" and `error` says why."""

    error: str = ""
    error_type: str = "engine_error"  # the JobError's type: "invalid_request_error" for a request at fault
