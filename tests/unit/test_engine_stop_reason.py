"""vLLM's stop_reason (the stop string or stop token id that ended a choice; None for EOS and length) and
include_stop_str_in_output, from the engine. On the CPU with a tiny random model and its tokenizer."""

from __future__ import annotations

import pytest

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.random_weights import write_random_model_dir

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    path = write_random_model_dir("tiny", tmp_path_factory.mktemp("m") / "tiny")
    return LLMEngine(path, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128))


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def free_run(engine):
    [out] = engine.generate([PROMPT], greedy())
    assert out.finish_reason == "length" and out.stop_reason is None
    return out


def test_a_stop_token_id_is_the_stop_reason(engine, free_run):
    stop = free_run.new_token_ids[3]
    first = free_run.new_token_ids.index(stop)
    [out] = engine.generate([PROMPT], greedy(stop_token_ids=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.new_token_ids == free_run.new_token_ids[: first + 1]


def test_a_stop_string_is_the_stop_reason_and_may_stay_in_the_text(engine, free_run):
    text = free_run.text_delta
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = text.index(stop)
    [out] = engine.generate([PROMPT], greedy(stop=[stop]))
    assert (out.finish_reason, out.stop_reason, out.text_delta) == ("stop", stop, text[:cut])
    [kept] = engine.generate([PROMPT], greedy(stop=[stop], include_stop_str_in_output=True))
    assert (kept.finish_reason, kept.stop_reason, kept.text_delta) == ("stop", stop, text[: cut + len(stop)])


def test_logit_bias_forces_a_token_on_the_greedy_path(engine, free_run):
    never = next(t for t in range(20, 200) if t not in free_run.new_token_ids)
    [out] = engine.generate([PROMPT], greedy(max_tokens=4, logit_bias={never: 100.0}))
    assert out.new_token_ids == [never] * 4
