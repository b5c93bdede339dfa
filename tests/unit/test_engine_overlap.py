"""The engine launches step N+1 before it reads step N's tokens (stand-in tokens, input ids carried on
the device). Whatever it overlaps, its outputs must equal those of an engine that waits for every token
before scheduling the next step: same tokens, finish reasons and logprobs, no stand-in ever visible, no
block leaked, and prefix-cache digests computed from real tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.sampling import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.random_weights import random_model, shape_config


@pytest.fixture(scope="module")
def tiny():
    return random_model(shape_config("tiny"), torch.float32, "cpu", seed=11)


def _engine(tiny, overlap: bool, **cfg) -> LLMEngine:
    model, mcfg = tiny
    config = EngineConfig(block_size=8, max_num_seqs=16, max_num_batched_tokens=128, max_model_len=96,
                          enforce_eager=True, **cfg)
    engine = LLMEngine.from_model(model, mcfg, config)
    if not overlap:
        engine._may_overlap = lambda in_flight: False  # read every step's tokens before the next one
    return engine


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], stagger: int = 0):
    """Steps the engine by hand (requests may arrive every `stagger` steps); returns per-request
    (tokens, finish reason, logprobs) and checks that nothing leaked."""
    got: dict[str, list] = {f"r{i}": [[], None, []] for i in range(len(prompts))}
    queue = list(enumerate(zip(prompts, params, strict=True)))
    step = 0
    while queue or engine.has_unfinished_requests():
        if queue and (stagger == 0 or step % stagger == 0):
            for i, (p, sp) in queue if stagger == 0 else queue[:1]:
                engine.add_request(f"r{i}", p, sp)
            queue = [] if stagger == 0 else queue[1:]
        for out in engine.step():
            acc = got[out.request_id]
            assert acc[1] is None, "output after the request finished"
            acc[0].extend(out.new_token_ids)
            acc[2].extend(out.logprobs or [])
            if out.finished:
                acc[1] = out.finish_reason
        step += 1
    assert all(t >= 0 for acc in got.values() for t in acc[0]), "a stand-in token reached an output"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [tuple(got[f"r{i}"][:2]) + ([(lp.token_id, round(lp.logprob, 5)) for lp in got[f"r{i}"][2]],)
            for i in range(len(prompts))]


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, size=int(k)).tolist() for k in rng.integers(3, 40, size=n)]


@pytest.mark.parametrize("stagger", [0, 3])
def test_overlapped_steps_equal_waiting_steps(tiny, stagger):
    prompts = _prompts(12, 0)
    # Learn which tokens greedy decoding emits, to make some of them stop tokens mid-sequence.
    plain = _run(_engine(tiny, False), prompts, [SamplingParams(max_tokens=20, temperature=0.0,
                                                                ignore_eos=True)] * len(prompts))
    stops = [plain[0][0][4], plain[3][0][1]]
    params = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=5 + i, temperature=0.0, stop_token_ids=stops, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=1 + i, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=18, temperature=0.0, logprobs=2, min_tokens=6,
                                         stop_token_ids=stops, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    waiting = _run(_engine(tiny, False), prompts, params, stagger)
    overlapped = _run(_engine(tiny, True), prompts, params, stagger)
    assert overlapped == waiting
    reasons = {r for _, r, _ in overlapped}
    assert reasons == {"stop", "length"}, reasons  # the stop-token path ran
    assert any(lps for *_, lps in overlapped)


def test_overlap_under_preemption_keeps_tokens(tiny):
    """A cache too small for the batch: sequences are preempted while their next token is in flight
    and recomputed later; their tokens must equal those from a cache that never preempts."""
    prompts = _prompts(24, 1)
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * len(prompts)
    roomy = _run(_engine(tiny, True), prompts, params)
    small = _engine(tiny, True, num_kv_blocks=24)
    preempted = []
    preempt = small.scheduler._preempt
    small.scheduler._preempt = lambda seq: (preempted.append(seq.pending >= 0), preempt(seq))
    assert _run(small, prompts, params) == roomy
    assert any(preempted), "no sequence was preempted with a token in flight"


def test_penalties_wait_for_real_tokens(tiny):
    """Penalties read the output on the host: those batches must not see stand-ins."""
    prompts = _prompts(6, 2)
    params = [SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=1.5, repetition_penalty=1.3,
                             ignore_eos=True)] * len(prompts)
    assert _run(_engine(tiny, True), prompts, params) == _run(_engine(tiny, False), prompts, params)


def test_prefix_digests_come_from_real_tokens(tiny):
    """A generated continuation, sent back as a prompt, hits the cache on the blocks that hold generated
    tokens: their digests were made from the tokens, not from stand-ins."""
    engine = _engine(tiny, True)
    prompt = _prompts(1, 3)[0][:10]
    first = _run(engine, [prompt], [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)])[0][0]
    again = prompt + first[:30]
    hits = engine.block_manager.prefix_hit_tokens
    second = _run(engine, [again], [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)])[0][0]
    assert engine.block_manager.prefix_hit_tokens - hits == (len(again) - 1) // 8 * 8
    assert second == first[30:40]


def test_latency_guard_launches_after_the_step_ends_so_an_arrival_joins_the_next(tiny, monkeypatch):
    """As on a GPU, every launched step is still running when the host looks. While batch and interactive work
    share the engine, a call finds the step in flight, waits for it and launches nothing: an interactive
    request added right after gets the next launch, its own step, instead of waiting behind a batch step
    queued already. The tokens are those of an engine that waits for every step."""
    from worker.engine.sampler import PendingSamples

    monkeypatch.setattr(PendingSamples, "done", lambda self: getattr(self, "waited", False))
    monkeypatch.setattr(PendingSamples, "wait", lambda self: setattr(self, "waited", True))
    prompts = _prompts(6, 4)
    params = [SamplingParams(max_tokens=40 if i < 4 else 6, temperature=0.0, ignore_eos=True)
              for i in range(len(prompts))]
    engine = _engine(tiny, True, latency_guard_s=3600.0)
    launched: list[set[str]] = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, *a: (launched.append({s.seq.request_id for s in sched.scheduled}),
                                              launch(sched, *a))[1]
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    for i in range(4):
        engine.add_request(f"b{i}", prompts[i], params[i], priority=2)
    for _ in range(3):
        step()
    engine.add_request("u0", prompts[4], params[4], priority=0)  # arms the guard
    while "u0" in engine._requests:
        step()
    assert engine._in_flight is not None and launched[-1] - {"u0"}, "no batch step in flight"
    n = len(launched)
    step()  # waits for the batch step in flight, launches nothing
    assert len(launched) == n and engine._in_flight is not None
    engine.add_request("u1", prompts[5], params[5], priority=0)
    step()
    assert launched[-1] == {"u1"}  # the arrival's own step, launched next
    while engine.has_unfinished_requests():
        step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    plain = _engine(tiny, False, latency_guard_s=0.0)
    expected = _run(plain, prompts, params)
    assert [outputs[rid] for rid in ("b0", "b1", "b2", "b3", "u0", "u1")] == [t for t, _, _ in expected]


def test_launch_totals_count_the_steps_and_tokens_launched(tiny):
    """The engine's step counters (exported by the worker, compared by `bench serve`): prompts of 60 and 80
    tokens under a 128-token budget take two prompt steps (the second one the rest of the long prompt beside
    the short one's first decode), then decodes only."""
    engine = _engine(tiny, overlap=True)
    prompts = [list(range(1, 61)), list(range(1, 81))]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert engine.stats()["launched_steps"] == 0
    _run(engine, prompts, [params, params])
    totals = engine.launched.totals()
    assert totals["prefill_steps"] == 2
    # Every prompt token once, and each output token but the last is fed back once.
    assert totals["step_tokens"] == 60 + 80 + 2 * (5 - 1)
    assert totals["steps"] == totals["prefill_steps"] + 4  # the long prompt's 4 decodes after its last chunk
    assert engine.stats()["launched_steps"] == totals["steps"]
