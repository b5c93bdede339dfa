"""A request whose sampling cannot run fails alone, with the reason; the others in its batch go on and
produce exactly the tokens they produce without it. On the CPU with a tiny random model."""

from __future__ import annotations

import asyncio

import pytest

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.outputs import FailedOutput
from worker.engine_loop import EngineLoop
from worker.models.random_weights import write_random_model_dir

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
GOOD = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=7, ignore_eos=True, logprobs=2)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    path = write_random_model_dir("tiny", tmp_path_factory.mktemp("m") / "tiny")
    return LLMEngine(path, EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05))


def poisoned(**fields) -> SamplingParams:
    """Parameters the gateway would refuse, as an older gateway or another client could still send them."""
    return SamplingParams.model_construct(**{**SamplingParams().model_dump(), "max_tokens": 8, **fields})


def run(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, list]:
    """Every output of each request, by request id, with all requests added before the first step."""
    for i, sp in enumerate(params):
        engine.add_request(f"r{i}", PROMPTS[i], sp)
    got: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out)
    return got


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("bad", [
    {"top_k": 10**20},  # overflows the int64 tensor of top-k values
    {"temperature": float("nan"), "top_p": float("nan")},
    {"min_p": -1.0},  # log of a negative number: NaN thresholds
])
def test_a_request_whose_sampling_raises_fails_alone(engine, bad):
    alone = run(engine, [GOOD[0], GOOD[1]])
    mixed = run(engine, [GOOD[0], GOOD[1], poisoned(**{"temperature": 1.0, **bad})])
    failed = mixed["r2"][-1]
    if isinstance(failed, FailedOutput):
        assert failed.finish_reason == "error" and "sampling failed" in failed.error
    else:  # some poisons do not raise on this torch; then the request must simply finish
        assert failed.finished
    for rid in ("r0", "r1"):
        assert tokens(mixed[rid]) == tokens(alone[rid]) and len(tokens(alone[rid])) == 8
        assert mixed[rid][-1].finish_reason == "length"
    assert [o.logprobs[0].token_id for o in mixed["r1"]] == tokens(mixed["r1"])


def test_overflowing_top_k_is_an_error_of_that_request(engine):
    got = run(engine, [GOOD[0], poisoned(temperature=1.0, top_k=10**20)])
    failed = got["r1"][-1]
    assert isinstance(failed, FailedOutput) and failed.finish_reason == "error"
    assert "Overflow" in failed.error or "overflow" in failed.error
    assert got["r0"][-1].finish_reason == "length"
    assert not engine.has_unfinished_requests() and engine.scheduler.num_running == 0


@pytest.mark.parametrize("field, params, prompt", [
    ("stop_token_ids", poisoned(stop_token_ids=[999_999_999], min_tokens=5), [5, 6]),
    ("prompt", SamplingParams(max_tokens=4), [5, 512]),
    ("prompt", SamplingParams(max_tokens=4), [-1, 5]),
])
def test_token_ids_outside_the_vocabulary_are_refused_at_add(engine, field, params, prompt):
    with pytest.raises(ValueError, match=f"{field}: token id .* outside the vocabulary"):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


async def test_engine_loop_fails_the_poisoned_jobs_and_runs_the_rest(engine):
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("ok-1", PROMPTS[0], GOOD[0])
        loop.add("bad-stop", [5, 6], poisoned(stop_token_ids=[999_999_999], min_tokens=5))
        loop.add("bad-top-k", PROMPTS[2], poisoned(temperature=1.0, top_k=10**20))
        loop.add("ok-2", PROMPTS[1], GOOD[1])
        ends: dict = {}
        while len(ends) < 4:
            batch = await asyncio.wait_for(loop.outputs.get(), 30)
            ends.update({o.request_id: o for o in batch if o.finished})
    finally:
        loop.stop()
    assert ends["ok-1"].finish_reason == ends["ok-2"].finish_reason == "length"
    assert ends["ok-1"].num_output_tokens == ends["ok-2"].num_output_tokens == 8
    for rid, needle in (("bad-stop", "outside the vocabulary"), ("bad-top-k", "sampling failed")):
        assert isinstance(ends[rid], FailedOutput) and ends[rid].finish_reason == "error"
        assert needle in ends[rid].error
    assert loop.step_errors == 0
