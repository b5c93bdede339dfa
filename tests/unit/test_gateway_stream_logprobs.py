"""The logprobs of a stream's chunks: in order, none twice, whatever deltas came with or without them."""

from __future__ import annotations

from gateway.jobs import Delta
from gateway.sse import _StreamLogprobs
from protocol.jobs import JobPayload, JobResult, TokenLogprob, Usage
from protocol.sampling import SamplingParams


def entry(i: int, logprob: float | None = -1.0) -> TokenLogprob:
    top = [] if logprob is None else [(i, f"w{i} ", -1.0)]
    return TokenLogprob(token_id=i, token=f"w{i} ", logprob=logprob, top=top)


def payload(kind: str, echo: str | None = None) -> JobPayload:
    sampling = SamplingParams(logprobs=1, prompt_logprobs=1 if echo is not None else None)
    return JobPayload(id="job_x", model="m", kind=kind,  # type: ignore[arg-type]
                      prompt_token_ids=[0, 1], sampling=sampling, echo_prompt=echo)


RESULT = JobResult(text="", finish_reason="length",
                   usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5), prompt_logprobs=[entry(0, None), entry(1)], logprobs=[entry(2), entry(3), entry(4)])


def test_deltas_then_the_rest_at_the_end_with_echo_offsets():
    s = _StreamLogprobs(payload("completion", echo="w0 w1 "))
    first = s.of_delta(Delta("w0 w1 w2 ", 0, [entry(0, None), entry(1), entry(2)]))
    assert first["token_logprobs"] == [None, -1.0, -1.0] and first["top_logprobs"][0] is None
    assert first["text_offset"] == [0, 3, 6]
    rest = s.rest(RESULT)
    assert rest["tokens"] == ["w3 ", "w4 "] and rest["text_offset"] == [9, 12]


def test_a_delta_without_logprobs_defers_the_rest_to_the_end():
    s = _StreamLogprobs(payload("chat"))
    assert s.of_delta(Delta("w2 ", 0, [entry(2)]))["content"][0]["token"] == "w2 "
    assert s.of_delta(Delta("w3 ", 3, None)) is None  # from the hash: its entries are not known here
    assert s.of_delta(Delta("w4 ", 6, [entry(4)])) is None  # would be out of order
    rest = s.rest(RESULT.model_copy(update={"prompt_logprobs": None}))
    assert [c["token"] for c in rest["content"]] == ["w3 ", "w4 "]


def test_a_completions_top_logprobs_always_hold_the_sampled_token():
    """OpenAI: up to logprobs + 1 entries, the sampled token's among them, as vLLM's."""
    from gateway.responses import CompletionLogprobs

    sampled = TokenLogprob(token_id=7, token=" rare", logprob=-9.0, top=[(1, ",", -0.1)])
    got = CompletionLogprobs().format([sampled, entry(2)])
    assert got["top_logprobs"] == [{",": -0.1, " rare": -9.0}, {"w2 ": -1.0}]
