"""Scheduler: one token budget, priority order, preemption by recompute, aborts, and a long simulation."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from protocol.sampling import SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.scheduler import Scheduler, SchedulerOutput
from worker.engine.sequence import Sequence, SequenceStatus

BS = 4
_ids = itertools.count()


def make(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16) -> tuple[Scheduler, BlockManager]:
    config = EngineConfig(block_size=BS, num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget)
    bm = BlockManager(num_blocks, BS)
    return Scheduler(config, bm), bm


def add(sched: Scheduler, prompt_len: int, priority: int = 1, first_token: int = 0) -> Sequence:
    tokens = [first_token + i for i in range(prompt_len)]
    seq = Sequence(f"r{next(_ids)}", tokens, SamplingParams(), priority=priority)
    sched.add(seq)
    return seq


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def check_invariants(sched: Scheduler, bm: BlockManager) -> None:
    refs = Counter(b for seq in sched._running for b in seq.block_table)
    assert all(block.ref_count == refs[block.block_id] for block in bm.blocks)
    assert bm.num_free_blocks == sum(1 for block in bm.blocks if block.ref_count == 0)
    for seq in sched._running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) * BS >= seq.num_computed_tokens
    for _, seq in sched._waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0


def step(sched: Scheduler, bm: BlockManager, max_output: int, token: int = 0) -> SchedulerOutput:
    """One engine step: schedule, 'run the model', append a token to samplers, finish at max_output."""
    out = sched.schedule()
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(sched._running) <= sched.config.max_num_seqs
    decode_flags = [s.is_decode for s in out.scheduled]
    assert decode_flags == sorted(decode_flags, reverse=True)  # decodes first
    decode_lens = [s.seq.num_tokens for s in out.scheduled if s.is_decode]
    assert decode_lens == sorted(decode_lens, reverse=True)  # longest context first
    sched.update_after_step(out)
    check_invariants(sched, bm)
    for s in out.scheduled:
        if s.samples:
            s.seq.append_token(token)
            if s.seq.num_output_tokens >= max_output:
                sched.finish(s.seq, "length")
    return out


def run_to_completion(sched: Scheduler, bm: BlockManager, max_output: int, max_steps: int = 100_000) -> int:
    for n in itertools.count(1):
        assert n <= max_steps, "scheduler stopped making progress"
        out = step(sched, bm, max_output)
        assert out.scheduled or out.rejected or out.preempted or not sched.has_unfinished()
        if not sched.has_unfinished():
            return n
    raise AssertionError("unreachable")


def test_decodes_and_chunked_prefill_share_the_budget() -> None:
    sched, bm = make(budget=10)
    short = add(sched, 3)
    long = add(sched, 20)
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(short.request_id, 3), (long.request_id, 7)]
    assert [s.samples for s in out.scheduled] == [True, False]
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(short.request_id, 1), (long.request_id, 9)]
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(short.request_id, 1), (long.request_id, 4)]
    assert out.scheduled[1].samples and long.num_output_tokens == 1
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(long.request_id, 1), (short.request_id, 1)]  # decodes: longest context first


def test_a_better_arrival_gets_a_step_of_its_own_then_decodes_come_first() -> None:
    sched, bm = make(budget=10)
    f = add(sched, 3, priority=1)
    step(sched, bm, max_output=100)
    e = add(sched, 12, priority=0)
    assert plan(step(sched, bm, max_output=100)) == [(e.request_id, 10)]  # f sits this one step out
    # e now runs ahead of f, but f's decode is laid out first.
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(f.request_id, 1), (e.request_id, 2)]
    assert [s.is_decode for s in out.scheduled] == [True, False]


def test_arrivals_every_step_cannot_starve_worse_work() -> None:
    """A better arrival in every step gets its own step at most every other step: the batch seq still
    decodes in every second step."""
    sched, bm = make(budget=64, max_num_seqs=64)
    batch = add(sched, 3, priority=2)
    step(sched, bm, max_output=100)
    ran = []
    for i in range(8):
        add(sched, 2, priority=0, first_token=100 + 10 * i)
        ran.append(batch in {s.seq for s in step(sched, bm, max_output=100).scheduled})
    assert ran == [False, True] * 4


def test_priority_beats_arrival() -> None:
    sched, bm = make(budget=10)
    batch = add(sched, 10, priority=2, first_token=0)
    interactive = add(sched, 10, priority=0, first_token=100)
    default = add(sched, 10, priority=1, first_token=200)
    assert plan(step(sched, bm, max_output=1)) == [(interactive.request_id, 10)]
    assert plan(step(sched, bm, max_output=1)) == [(default.request_id, 10)]
    assert plan(step(sched, bm, max_output=1)) == [(batch.request_id, 10)]
    assert not sched.has_unfinished()


def test_max_num_seqs_caps_admission() -> None:
    sched, bm = make(max_num_seqs=2)
    seqs = [add(sched, 2) for _ in range(3)]
    out = step(sched, bm, max_output=100)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert sched.num_running == 2 and sched.num_waiting == 1


def test_preemption_takes_newest_lowest_priority_then_recomputes() -> None:
    sched, bm = make(num_blocks=4, budget=64)
    a, b, c = (add(sched, BS, first_token=100 * i) for i in range(3))
    step(sched, bm, max_output=4)  # three full blocks, one free; each now needs a second block
    out = step(sched, bm, max_output=4)
    assert out.preempted == [c]
    assert plan(out) == [(a.request_id, 1), (b.request_id, 1)]
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_output_tokens == 1  # its sampled token is kept and will be recomputed
    steps = 0
    while c.status is SequenceStatus.WAITING:
        out = step(sched, bm, max_output=4)
        steps += 1
        assert steps < 20
    resumed = next(s for s in out.scheduled if s.seq is c)
    # Prompt + output recomputed (its prompt block may come back from the prefix cache).
    assert c.num_computed_tokens == BS + 1 and resumed.samples
    run_to_completion(sched, bm, max_output=4)
    for seq in (a, b, c):
        assert seq.finish_reason == "length" and seq.num_output_tokens == 4
    assert bm.num_free_blocks == 4


def test_running_preemption_prefers_worse_priority_over_newer() -> None:
    sched, bm = make(num_blocks=3, budget=64)
    worse = add(sched, BS, priority=2, first_token=0)
    better = add(sched, BS, priority=0, first_token=100)
    middle = add(sched, BS, priority=1, first_token=200)
    step(sched, bm, max_output=10)
    out = step(sched, bm, max_output=10)
    # better needs a block first and evicts the batch seq, though it is the oldest; then middle
    # finds no block and nothing worse than itself, so it steps aside.
    assert out.preempted == [worse, middle]
    assert plan(out) == [(better.request_id, 1)] and better.num_output_tokens == 2


def test_waiting_interactive_preempts_running_batch() -> None:
    sched, bm = make(num_blocks=4, budget=64)
    batch = add(sched, 4 * BS - 1, priority=2)
    step(sched, bm, max_output=10)
    assert bm.num_free_blocks == 0
    urgent = add(sched, BS, priority=0, first_token=500)
    out = step(sched, bm, max_output=10)
    assert out.preempted == [batch] and plan(out) == [(urgent.request_id, BS)]
    # Same priority never preempts: a default seq waits behind a running default seq.
    sched2, bm2 = make(num_blocks=4, budget=64)
    first = add(sched2, 4 * BS - 1)
    step(sched2, bm2, max_output=10)
    add(sched2, BS, first_token=500)
    out = step(sched2, bm2, max_output=10)
    assert out.preempted == [] and plan(out) == [(first.request_id, 1)]


def test_abort_frees_blocks() -> None:
    sched, bm = make(num_blocks=8, max_num_seqs=1)
    running = add(sched, 2 * BS)
    waiting = add(sched, BS)
    step(sched, bm, max_output=10)
    assert bm.num_free_blocks < 8
    assert sched.abort(running.request_id) is running
    assert running.status is SequenceStatus.FINISHED and running.finish_reason == "abort"
    assert bm.num_free_blocks == 8 and sched.num_running == 0
    assert sched.abort(waiting.request_id) is waiting and sched.num_waiting == 0
    assert sched.abort("nope") is None and sched.get(waiting.request_id) is None
    assert not sched.has_unfinished()


def test_abort_during_a_step_is_skipped_by_update() -> None:
    sched, bm = make()
    seq = add(sched, 5)
    out = sched.schedule()
    sched.abort(seq.request_id)
    sched.update_after_step(out)
    assert seq.num_computed_tokens == 0 and bm.num_free_blocks == bm.num_blocks


def test_too_long_sequences_are_rejected_not_looped() -> None:
    sched, bm = make(num_blocks=4, budget=8)
    huge = add(sched, 4 * BS + 1)
    ok = add(sched, 3)
    out = step(sched, bm, max_output=2)
    assert out.rejected == [huge] and huge.finish_reason == "error"
    assert plan(out) == [(ok.request_id, 3)]
    run_to_completion(sched, bm, max_output=2)
    assert ok.finish_reason == "length"
    # A seq that outgrows the whole cache while decoding ends the same way.
    grower = add(sched, 4 * BS - 1)
    run_to_completion(sched, bm, max_output=50)
    assert grower.finish_reason == "error" and grower.num_tokens == 4 * BS + 1
    assert bm.num_free_blocks == 4


def test_prefix_cache_hit_through_the_scheduler() -> None:
    sched, bm = make()
    first = add(sched, 3 * BS + 2)
    run_to_completion(sched, bm, max_output=1)
    second = add(sched, 3 * BS + 2)
    out = step(sched, bm, max_output=1)
    assert plan(out) == [(second.request_id, 2)]
    assert second.num_cached_tokens == 3 * BS and first.num_cached_tokens == 0


def test_thousand_sequences_with_a_tiny_cache() -> None:
    rng = random.Random(0)
    sched, bm = make(num_blocks=16, budget=32, max_num_seqs=8)
    seqs = []
    for _ in range(1000):
        # Shared first tokens (few distinct prefixes) make prefix hits and shared blocks common.
        seqs.append(add(sched, rng.randint(1, 30), priority=rng.choice([0, 1, 2]),
                        first_token=rng.choice([0, 1000, 2000])))
    run_to_completion(sched, bm, max_output=5)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 5 for s in seqs)
    assert bm.num_free_blocks == 16
    assert sum(s.num_preemptions for s in seqs) > 0  # the cache really was tight
    assert bm.prefix_hit_tokens > 0


def test_better_priority_takes_a_full_sequence_slot() -> None:
    """Every slot holds a batch seq and blocks are plenty: an interactive seq preempts the newest batch
    seq in the very step it is scheduled, the batch seq waits without preempting back, then resumes."""
    sched, bm = make(num_blocks=64, budget=64, max_num_seqs=2)
    old = add(sched, BS, priority=2, first_token=0)
    new = add(sched, BS, priority=2, first_token=100)
    step(sched, bm, max_output=6)
    urgent = add(sched, BS, priority=0, first_token=200)
    out = step(sched, bm, max_output=6)
    assert out.preempted == [new]
    assert plan(out) == [(urgent.request_id, BS)]  # the urgent seq's own step: old sits it out
    assert new.status is SequenceStatus.WAITING and new.num_output_tokens == 1
    # The preempted batch seq takes no slot back, from the interactive seq nor from its batch peer...
    while old.status is SequenceStatus.RUNNING:
        out = step(sched, bm, max_output=6)
        assert out.preempted == [] and new.status is SequenceStatus.WAITING
    # ...and resumes in the step after a slot frees: its prompt block comes back from the prefix cache,
    # its one output token is recomputed.
    out = step(sched, bm, max_output=6)
    assert new.status is SequenceStatus.RUNNING and new.num_preemptions == 1
    assert (new.request_id, 1) in plan(out) and new.num_computed_tokens == BS + 1
    run_to_completion(sched, bm, max_output=6)
    assert all(s.num_output_tokens == 6 and s.finish_reason == "length" for s in (old, new, urgent))
    assert bm.num_free_blocks == bm.num_blocks


def test_same_priority_waits_for_a_slot() -> None:
    sched, bm = make(num_blocks=64, max_num_seqs=2)
    running = [add(sched, BS, priority=2) for _ in range(2)]
    step(sched, bm, max_output=10)
    late = add(sched, BS, priority=2, first_token=300)
    for _ in range(3):
        out = step(sched, bm, max_output=10)
        assert out.preempted == [] and late.status is SequenceStatus.WAITING
    assert all(s.status is SequenceStatus.RUNNING for s in running)


def test_slot_preemption_takes_worst_priority_first() -> None:
    sched, bm = make(num_blocks=64, max_num_seqs=3)
    default = add(sched, BS, priority=1, first_token=0)
    batch_old = add(sched, BS, priority=2, first_token=100)
    batch_new = add(sched, BS, priority=2, first_token=200)
    step(sched, bm, max_output=20)
    urgent = [add(sched, BS, priority=0, first_token=300 + 10 * i) for i in range(2)]
    out = step(sched, bm, max_output=20)
    assert out.preempted == [batch_new, batch_old]  # the newest batch seq first, the default one kept
    assert {s.seq for s in out.scheduled} == set(urgent)  # their own step: the default seq sits it out
    assert default in {s.seq for s in step(sched, bm, max_output=20).scheduled}


def test_waiting_priority_and_preemptible_counts() -> None:
    sched, bm = make(num_blocks=64, max_num_seqs=3)
    assert sched.best_waiting_priority() is None
    add(sched, BS, priority=2)
    add(sched, BS, priority=1, first_token=100)
    assert sched.best_waiting_priority() == 1
    step(sched, bm, max_output=20)
    assert sched.best_waiting_priority() is None
    assert [sched.num_running_worse_than(p) for p in (0, 1, 2)] == [2, 1, 0]


def test_mixed_priorities_under_tight_slots_and_blocks() -> None:
    """Slot and block preemption together, many priorities, a tiny cache: everything finishes, nothing
    leaks, and a seq is only ever preempted for a better one or for blocks."""
    rng = random.Random(1)
    sched, bm = make(num_blocks=24, budget=32, max_num_seqs=4)
    seqs = []
    for _ in range(300):
        seqs.append(add(sched, rng.randint(1, 20), priority=rng.choice([0, 2, 2, 2]),
                        first_token=rng.choice([0, 1000])))
        if rng.random() < 0.3:
            step(sched, bm, max_output=6)
    run_to_completion(sched, bm, max_output=6)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 6 for s in seqs)
    assert bm.num_free_blocks == 24
    assert sum(s.num_preemptions for s in seqs if s.priority == 2) > 0


def test_batch_prefill_chunks_leave_budget_to_a_waiting_interactive_seq() -> None:
    """A long batch prompt is prefilled in chunks. An interactive seq that arrives meanwhile gets a step of
    its own; a second one, arriving just after, gets its whole prefill into the next ordinary step (the
    batch chunk shrinks), not a step later; decodes are never held back in an ordinary step."""
    sched, bm = make(num_blocks=64, budget=16, max_num_seqs=4)
    decoding = add(sched, 2, priority=2, first_token=0)
    step(sched, bm, max_output=50)
    long = add(sched, 60, priority=2, first_token=100)
    out = step(sched, bm, max_output=50)
    assert plan(out) == [(decoding.request_id, 1), (long.request_id, 15)]
    urgent = add(sched, 10, priority=0, first_token=300)
    out = step(sched, bm, max_output=50)
    assert plan(out) == [(urgent.request_id, 10)]
    second = add(sched, 10, priority=0, first_token=400)
    out = step(sched, bm, max_output=50)
    assert plan(out) == [(urgent.request_id, 1), (decoding.request_id, 1), (long.request_id, 4),
                         (second.request_id, 10)]
    assert urgent.num_output_tokens == 2 and second.num_output_tokens == 1 and out.preempted == []
    out = step(sched, bm, max_output=50)
    assert plan(out) == [(urgent.request_id, 1), (second.request_id, 1), (decoding.request_id, 1),
                         (long.request_id, 13)]


def test_an_arrival_that_cannot_run_does_not_stop_the_others() -> None:
    sched, bm = make(num_blocks=8, budget=64)
    batch = add(sched, 3, priority=2)
    step(sched, bm, max_output=100)
    too_long = add(sched, 9 * BS, priority=0, first_token=100)  # more than the whole cache
    out = step(sched, bm, max_output=100)
    assert out.rejected == [too_long] and plan(out) == [(batch.request_id, 1)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_guarded(guard_s: float, chunk: int, budget: int = 64) -> tuple[Scheduler, BlockManager, Clock]:
    config = EngineConfig(block_size=BS, num_kv_blocks=64, max_num_seqs=16, max_num_batched_tokens=budget,
                          latency_guard_s=guard_s, guarded_prefill_tokens=chunk)
    bm = BlockManager(64, BS)
    clock = Clock()
    return Scheduler(config, bm, clock), bm, clock


def test_latency_guard_arms_on_mixed_priorities_and_holds_for_its_time() -> None:
    sched, bm, clock = make_guarded(guard_s=1.0, chunk=8)
    batch = add(sched, 3, priority=2)
    step(sched, bm, max_output=100)
    assert not sched.latency_guarded()  # one priority alone: never armed
    clock.now = 10.0
    urgent = add(sched, 3, priority=0, first_token=100)
    assert sched.latency_guarded()  # a better seq waits
    step(sched, bm, max_output=100)
    sched.finish(urgent, "stop")
    clock.now = 10.9
    assert sched.latency_guarded()  # gone, but more may come: held until 11.0
    clock.now = 11.0
    assert not sched.latency_guarded()
    assert batch.status is SequenceStatus.RUNNING


def test_latency_guard_caps_worse_prefill_chunks_not_decodes_nor_the_better_seq() -> None:
    sched, bm, _ = make_guarded(guard_s=3600.0, chunk=8)
    decoding = [add(sched, 2, priority=2, first_token=10 * i) for i in range(3)]
    step(sched, bm, max_output=100)
    long_a = add(sched, 30, priority=2, first_token=200)
    long_b = add(sched, 30, priority=2, first_token=300)
    urgent = add(sched, 20, priority=0, first_token=400)
    assert plan(step(sched, bm, max_output=100)) == [(urgent.request_id, 20)]  # its own step, uncapped
    # Decodes of every priority as before; the two batch prompts share 8 tokens a step.
    out = step(sched, bm, max_output=100)
    assert plan(out) == [(urgent.request_id, 1)] + [(s.request_id, 1) for s in decoding] + [(long_a.request_id, 8)]
    out = step(sched, bm, max_output=100)
    assert plan(out)[-1] == (long_a.request_id, 8) and long_b.status is SequenceStatus.WAITING
    sched.finish(urgent, "stop")
    # Still guarded after the urgent seq is gone: the cap holds.
    assert plan(step(sched, bm, max_output=100)) == [(s.request_id, 1) for s in decoding] + [(long_a.request_id, 8)]


def test_latency_guard_off_with_zero() -> None:
    sched, bm, _ = make_guarded(guard_s=0.0, chunk=8)
    add(sched, 3, priority=2)
    step(sched, bm, max_output=100)
    add(sched, 3, priority=0, first_token=100)
    assert not sched.latency_guarded()
    long = add(sched, 30, priority=2, first_token=200)
    step(sched, bm, max_output=100)  # the better seq's own step
    assert (long.request_id, 30) in plan(step(sched, bm, max_output=100))
