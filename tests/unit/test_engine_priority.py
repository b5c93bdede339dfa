"""Priorities inside the engine: with every sequence slot held by batch work, an interactive request is
admitted at once by preempting a batch sequence (by recompute), and the preempted sequence resumes to
exactly the tokens it would have produced without the preemption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.sequence import SequenceStatus
from worker.models.random_weights import random_model, shape_config

BATCH, INTERACTIVE = 2, 0


@pytest.fixture(scope="module")
def tiny():
    return random_model(shape_config("tiny"), torch.float32, "cpu", seed=5)


def _engine(tiny, max_num_seqs: int, **cfg) -> LLMEngine:
    model, mcfg = tiny
    config = EngineConfig(block_size=8, num_kv_blocks=160, max_num_seqs=max_num_seqs, max_num_batched_tokens=256,
                          max_model_len=128, enforce_eager=True, **cfg)
    return LLMEngine.from_model(model, mcfg, config)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, size=int(k)).tolist() for k in rng.integers(5, 40, size=n)]


def _params(n: int, max_tokens: int) -> list[SamplingParams]:
    """Greedy with logprobs, and every third one seeded random sampling (its generator must not replay)."""
    return [SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
            if i % 3 == 2 else SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
            for i in range(n)]


def _drain(engine: LLMEngine, got: dict[str, list], step_of_first: dict[str, int], steps: int) -> int:
    for out in engine.step():
        acc = got.setdefault(out.request_id, [[], None, []])
        if out.new_token_ids and out.request_id not in step_of_first:
            step_of_first[out.request_id] = steps
        acc[0].extend(out.new_token_ids)
        acc[2].extend((lp.token_id, round(lp.logprob, 4)) for lp in out.logprobs or [])
        if out.finished:
            acc[1] = out.finish_reason
    return steps + 1


def _alone(tiny, prompts, params) -> dict[str, list]:
    """Each request in an engine with room for all of them: nothing is ever preempted."""
    engine = _engine(tiny, max_num_seqs=64)
    got: dict[str, list] = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    steps = 0
    while engine.has_unfinished_requests():
        steps = _drain(engine, got, {}, steps)
    assert engine.scheduler.num_preemptions == 0
    return got


def test_interactive_preempts_full_batch_and_batch_resumes_identically(tiny):
    batch_prompts, urgent_prompts = _prompts(6, 0), _prompts(3, 1)
    batch_params, urgent_params = _params(6, 40), _params(3, 6)
    prompts, params = batch_prompts + urgent_prompts, batch_params + urgent_params
    expected = _alone(tiny, prompts, params)

    engine = _engine(tiny, max_num_seqs=4)
    got: dict[str, list] = {}
    first: dict[str, int] = {}
    for i in range(6):
        engine.add_request(f"r{i}", prompts[i], params[i], priority=BATCH)
    steps = 0
    while engine.scheduler.num_running < 4 or any(f"r{i}" not in first for i in range(4)):
        steps = _drain(engine, got, first, steps)
    added_at = {}
    for j in range(3):  # one interactive request now and then, each while every slot holds batch work
        for _ in range(5):
            steps = _drain(engine, got, first, steps)
        assert engine.scheduler.num_running == 4
        rid = f"r{6 + j}"
        engine.add_request(rid, prompts[6 + j], params[6 + j], priority=INTERACTIVE)
        added_at[rid] = steps
    while engine.has_unfinished_requests():
        steps = _drain(engine, got, first, steps)

    assert engine.scheduler.num_preemptions >= 3  # each interactive request took a batch sequence's slot
    for rid, at in added_at.items():
        # The first token comes out of the step that prefilled it or the next (one step stays in flight),
        # while the batch lines still had 20+ tokens to go.
        assert first[rid] - at <= 2, (rid, first[rid], at)
    assert got == expected
    assert all(reason == "length" for _, reason, _ in got.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_admissible_room_by_priority(tiny):
    engine = _engine(tiny, max_num_seqs=4, priority_headroom=3)
    assert [engine.num_admissible(p) for p in (0, 1, 2)] == [4, 4, 4]
    for i, p in enumerate(_prompts(4, 2)):
        engine.add_request(f"b{i}", p, SamplingParams(max_tokens=50, ignore_eos=True), priority=BATCH)
    engine.step()
    assert engine.scheduler.num_running == 4
    # Full of batch work: no room for more of it; room for better lanes, capped by the headroom.
    assert [engine.num_admissible(p) for p in (0, 1, 2)] == [3, 3, 0]
    engine.add_request("i0", _prompts(1, 3)[0], SamplingParams(max_tokens=5, ignore_eos=True), priority=INTERACTIVE)
    assert engine.num_admissible(0) == 0  # it waits (until the next step): pull no more of its kind
    urgent = engine.scheduler.get("i0")
    for _ in range(3):  # a step that hands out first tokens returns before it schedules the next
        if urgent.status is SequenceStatus.RUNNING:
            break
        engine.step()
    assert urgent.status is SequenceStatus.RUNNING
    assert engine.scheduler.num_running == 4 and engine.scheduler.num_waiting == 1  # a batch seq waits
    assert [engine.num_admissible(p) for p in (0, 1, 2)] == [3, 3, 0]
