"""Several choices of one prompt in the engine (n, best_of): the choices share the prompt's KV blocks,
differ under sampling, are reproducible with a seed, and best_of hands out the n of highest logprob per
token. On the CPU with a tiny random model."""

from __future__ import annotations

import pytest
import torch

from protocol.sampling import SamplingParams
from worker.engine.choices import choice_seed
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.models.random_weights import random_model, shape_config

BLOCK = 8
PROMPT = list(range(5, 5 + 60))  # 7 full blocks and 4 tokens


@pytest.fixture(scope="module")
def tiny():
    return random_model(shape_config("tiny"), torch.float32, "cpu", seed=11)


def _engine(tiny, **cfg) -> LLMEngine:
    model, mcfg = tiny
    config = EngineConfig(block_size=BLOCK, num_kv_blocks=160, max_num_seqs=32, max_num_batched_tokens=256,
                          max_model_len=128,
                          enforce_eager=True, **cfg)
    return LLMEngine.from_model(model, mcfg, config)


def _sampled(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 6, "temperature": 1.0, "ignore_eos": True, **kw})


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_choices_share_the_prompt_blocks(tiny, prefix_caching):
    engine = _engine(tiny, enable_prefix_caching=prefix_caching)
    bm = engine.block_manager
    engine.add_request("r", PROMPT, _sampled(n=8, max_tokens=4))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
    full = (len(PROMPT) - 1) // BLOCK  # 7 blocks shared; each choice holds its own tail block
    tail = bm.blocks_needed(len(PROMPT) + 4) - full  # 1: the prompt's last 4 tokens and 4 generated
    assert peak == full + 8 * tail, peak
    assert peak < 8 * bm.blocks_needed(len(PROMPT))  # not 8 prompts
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked


def test_choices_differ_and_a_seed_reproduces_them(tiny):
    engine = _engine(tiny)
    [a] = engine.generate_choices([PROMPT], _sampled(n=4, seed=123))
    [b] = engine.generate_choices([PROMPT], _sampled(n=4, seed=123))
    assert [o.index for o in a] == [0, 1, 2, 3]
    assert [o.new_token_ids for o in a] == [o.new_token_ids for o in b]
    assert len({tuple(o.new_token_ids) for o in a}) > 1
    assert all(o.finished and o.finish_reason == "length" and len(o.new_token_ids) == 6 for o in a)
    # Choice 0 samples as the request with n = 1 does; choice i as n = 1 with its derived seed.
    [one] = engine.generate([PROMPT], _sampled(seed=123))
    assert one.new_token_ids == a[0].new_token_ids
    [third] = engine.generate([PROMPT], _sampled(seed=choice_seed(123, 2)))
    assert third.new_token_ids == a[2].new_token_ids


def test_greedy_choices_are_identical(tiny):
    [outs] = _engine(tiny).generate_choices([PROMPT], SamplingParams(n=3, max_tokens=5, temperature=0.0,
                                                                       ignore_eos=True))
    assert len(outs) == 3 and outs[0].new_token_ids == outs[1].new_token_ids == outs[2].new_token_ids


def test_best_of_returns_the_n_of_highest_logprob_per_token(tiny):
    """Sequences that stop at different lengths (a stop token): the ranking is per token, not the sum, which
    would favour the shortest."""
    engine = _engine(tiny)
    stop = {"stop_token_ids": list(range(0, 512, 8))}  # an eighth of the tiny vocabulary ends a sequence
    [every] = engine.generate_choices([PROMPT], _sampled(n=5, seed=9, logprobs=0, max_tokens=12, **stop))
    [best] = engine.generate_choices([PROMPT], _sampled(n=2, best_of=5, seed=9, max_tokens=12, **stop))
    assert len({len(o.new_token_ids) for o in every}) > 1  # the case where sum and mean can disagree
    scores = sorted((sum(lp.logprob for lp in o.logprobs) / len(o.logprobs), o.new_token_ids) for o in every)
    assert [o.index for o in best] == [0, 1]
    assert [o.new_token_ids for o in best] == [ids for _, ids in reversed(scores[-2:])]
    assert all(o.logprobs is None for o in best)  # not asked for: used to rank only


def test_best_of_ranks_by_logprob_per_token_not_by_the_sum():
    from worker.engine.choices import ChoiceGroup
    from worker.engine.outputs import RequestOutput, TokenLogprobs

    group = ChoiceGroup("r", SamplingParams(n=1, best_of=2, max_tokens=10), sequences=[object(), object()])

    def out(index: int, logprobs: list[float]) -> RequestOutput:
        return RequestOutput("r", list(range(len(logprobs))), "", finished=True, finish_reason="stop", index=index,
                             logprobs=[TokenLogprobs(i, lp) for i, lp in enumerate(logprobs)])

    assert group.collect(out(0, [-0.5, -0.5])) == []  # short: sum -1.0, mean -0.5
    [best] = group.collect(out(1, [-0.2] * 10))  # long: sum -2.0, mean -0.2
    assert len(best.new_token_ids) == 10 and best.index == 0


def test_a_choice_stops_on_its_own_and_the_request_ends_with_the_last(tiny):
    engine = _engine(tiny)
    engine.add_request("r", PROMPT, _sampled(n=3, seed=1, max_tokens=8))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    finished = [o for o in outs if o.finished]
    assert sorted(o.index for o in finished) == [0, 1, 2]
    assert [o.request_finished for o in outs].count(True) == 1 and outs[-1].request_finished
    assert {o.request_id for o in outs} == {"r"}


def test_abort_ends_every_choice(tiny):
    engine = _engine(tiny)
    engine.add_request("r", PROMPT, _sampled(n=4, max_tokens=50))
    engine.step()
    engine.step()
    engine.abort_request("r")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    aborted = [o for o in outs if o.finish_reason == "abort"]
    assert len(aborted) == 1 and aborted[0].request_finished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_choices_not_yet_forked_hold_their_sequence_slots(tiny):
    """Intake's room counts sequences: a request of n choices takes n slots from its add on, before its
    other choices share the prompt and reach the scheduler."""
    engine = _engine(tiny)
    free = engine.num_admissible(0)
    assert free == 32
    engine.add_request("r", PROMPT, _sampled(n=4, max_tokens=4), priority=1)
    assert engine.num_admissible(0) == free - 3  # the first is waiting (not running); three wait for it
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_admissible(0) == free


def test_choices_waiting_with_shared_blocks_give_them_up_when_nothing_else_can_run(tiny):
    """A request's other choices hold its prompt's shared blocks from the fork on, waiting. With the cache
    nearly full, a seq at the queue's head that needed one of those blocks waited for ever with nothing
    running (every later step empty); now the waiting choices give them back, as a preemption would."""
    model, mcfg = tiny
    config = EngineConfig(block_size=16, num_kv_blocks=10, max_num_seqs=2, max_num_batched_tokens=256,
                          max_model_len=128, enforce_eager=True, latency_guard_s=0)
    engine = LLMEngine.from_model(model, mcfg, config)
    engine.add_request("long", list(range(5, 25)), SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    engine.add_request("forked", list(range(100, 164)), SamplingParams(max_tokens=60, n=3, temperature=0.0,
                                                                       ignore_eos=True))
    tokens: dict[tuple[str, int], int] = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            tokens[out.request_id, out.index] = tokens.get((out.request_id, out.index), 0) + len(out.new_token_ids)
    assert not engine.has_unfinished_requests()
    assert tokens == {("long", 0): 100, ("forked", 0): 60, ("forked", 1): 60, ("forked", 2): 60}
    assert engine.block_manager.num_free_blocks == 10 and engine.scheduler.num_preemptions > 0


def test_a_request_id_with_a_hash_is_refused_as_it_could_take_a_choices_id(tiny):
    """`a#1` then `a` with n=2 made two sequences of one id: the second overwrote the first's state."""
    engine = _engine(tiny)
    with pytest.raises(ValueError, match="'a#1': '#' is kept for the ids of a request's choices"):
        engine.add_request("a#1", PROMPT, _sampled())
    engine.add_request("a", PROMPT, _sampled(n=2))
    assert sorted(engine._requests) == ["a", "a#1"]
