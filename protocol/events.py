"""Events on a job's pub/sub channel. Deltas carry a sequence number and a character offset so that a
reader who resumes from the stored snapshot neither loses nor repeats text."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, TypeAdapter

from protocol.jobs import JobError, JobResult, JobState, TokenLogprob


class DeltaEvent(BaseModel):
    type: Literal["delta"] = "delta"
    seq: int  # increases by one per published delta of this job
    offset: int  # character offset of `text` in its choice's whole output
    index: int = 0  # the choice (0 to n - 1)
    text: str
    token_ids: list[int] = []
    # With logprobs asked: the entries that follow the ones published before, in order (the echoed
    # prompt's first); the final result holds them all.
    logprobs: list[TokenLogprob] | None = None
    # On a choice's last delta when it ends before the job (a job of several choices whose others go on), so
    # that a stream ends that choice at once, as OpenAI's do; the final result holds every choice's end.
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class StateEvent(BaseModel):
    """Job moved to `running` (first token on its way) or to a final state (then result or error is set)."""

    type: Literal["state"] = "state"
    seq: int
    state: JobState
    result: JobResult | None = None
    error: JobError | None = None


Event = DeltaEvent | StateEvent


_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(raw: str | bytes) -> Event:
    return _ADAPTER.validate_json(raw)
