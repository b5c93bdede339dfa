"""Picks each step's work under one token budget shared by decodes and chunked prefills (vLLM v1 style).

Order is (priority, arrival). A waiting seq that finds no free block or sequence slot preempts (by
recompute) the worst running seq of a worse priority, so an interactive request never waits for a batch
line to finish; the same priority never preempts, so a lane with work of one priority alone runs as if
there were no preemption at all. A seq that arrives with a better priority than running work gets a step
of its own (the worse work sits that one step out), so its first token does not wait behind a full batch
step; never two such steps in a row, so a stream of arrivals cannot starve the worse work.

While work of several priorities is in the engine, and for `latency_guard_s` after, the latency guard holds:
the engine launches a step only once the one before it has ended on the device (llm_engine), and prefill
chunks of a worse priority than the guard's share `guarded_prefill_tokens` a step, so the step an arrival
waits for is short."""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.sequence import WORST_PRIORITY, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    # Fixed at schedule time: after update_after_step advances num_computed_tokens the formula no
    # longer holds, yet the engine still needs to know which seqs to append a sampled token to.
    _samples: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """True when this step computes the seq's last known token, so the runner samples the next one."""
        return self._samples

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self._samples


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # decodes first, then prefill chunks
    preempted: list[Sequence]
    num_batched_tokens: int
    rejected: list[Sequence] = field(default_factory=list)  # finished with "error": can never fit the cache

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.block_manager = block_manager
        self._waiting: list[tuple[tuple[int, float, int], Sequence]] = []  # heap by sort_key
        self._running: list[Sequence] = []  # sorted by sort_key: best first, preemption victim last
        self._seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0  # lifetime total, for the preemptions counter
        self._cut_last_step = False  # the last step was a better arrival's own
        self._guard_until = float("-inf")  # the latency guard holds until then (by `clock`)
        self._guard_priority = WORST_PRIORITY  # the best priority seen while it was armed

    # -- bookkeeping ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        assert seq.request_id not in self._seqs, f"duplicate request id {seq.request_id}"
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.request_id] = seq
        heapq.heappush(self._waiting, (seq.sort_key, seq))

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:  # e.g. aborted while its step ran: keep the first reason
            return
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            # Aborts of waiting seqs are rare; a linear removal keeps the heap simple.
            self._waiting = [e for e in self._waiting if e[1] is not seq]
            heapq.heapify(self._waiting)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._seqs.pop(seq.request_id, None)

    def best_waiting_priority(self) -> int | None:
        """The priority of the best waiting seq (the heap's top), or None when none waits."""
        return self._waiting[0][1].priority if self._waiting else None

    def latency_guarded(self) -> bool:
        """True while seqs of several priorities are in the engine (a waiting one better than the worst running
        one counts), and for `latency_guard_s` after: more better-priority arrivals are likely then."""
        now = self.clock()
        if self.config.latency_guard_s > 0 and self._running:
            best = self._running[0].priority
            if self._waiting:
                best = min(best, self._waiting[0][1].priority)
            if best < self._running[-1].priority:
                self._guard_until = now + self.config.latency_guard_s
                self._guard_priority = best
        return now < self._guard_until

    def num_running_worse_than(self, priority: int) -> int:
        """Running seqs a waiting seq of `priority` may preempt."""
        return len(self._running) - bisect.bisect_right(self._running, priority, key=lambda s: s.priority)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the KV, keep the tokens; the seq re-prefills prompt + output later."""
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self._waiting, (seq.sort_key, seq))

    # -- the step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cutoff = None if self._cut_last_step else self.better_arrival()
        chunk_cap = self.config.guarded_prefill_tokens if self.latency_guarded() else None
        out = self._schedule(cutoff, chunk_cap)
        if cutoff is not None and not out.scheduled:  # the arrival cannot be admitted: run the others
            first, out = out, self._schedule(None, chunk_cap)
            out.preempted[:0], out.rejected[:0] = first.preempted, first.rejected
            cutoff = None
        self._cut_last_step = cutoff is not None
        return out

    def better_arrival(self) -> int | None:
        """The best waiting priority when it is better than some running seq's, else None."""
        best = self.best_waiting_priority()
        if best is None or not self._running or best >= self._running[-1].priority:
            return None
        return best

    def _schedule(self, cutoff: int | None, chunk_cap: int | None = None) -> SchedulerOutput:
        """One step's work; with `cutoff`, only seqs of that priority or better; with `chunk_cap`, prefill
        chunks of seqs worse than the latency guard's priority take at most that many tokens together."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        capped_left = chunk_cap if chunk_cap is not None else budget

        def capped(seq: Sequence) -> bool:
            return chunk_cap is not None and seq.priority > self._guard_priority

        scheduled: dict[str, ScheduledSeq] = {}  # insertion order: running first, then admitted
        preempted: list[Sequence] = []
        rejected: list[Sequence] = []

        # Running seqs first, best first: they already hold blocks, and finishing them frees blocks. Their
        # prefill chunks leave what better waiting seqs need, so a batch prompt never pushes an interactive
        # prefill to a later step (decodes, one token each, are never held back).
        reserve = self._reserve_for_better()
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if cutoff is not None and seq.priority > cutoff:
                break  # sorted: the rest is worse too
            left = seq.num_tokens - seq.num_computed_tokens
            chunk_capped = left > 1 and capped(seq)
            num_new = min(left, budget - reserve.get(seq.priority, 0) if left > 1 else budget)
            if chunk_capped:
                num_new = min(num_new, capped_left)
            if num_new <= 0:  # waiting for its sampled token to be appended, or its chunk yields
                i += 1
                continue
            while not bm.allocate_slots(seq, num_new):
                # The list is sorted and we walk it in order, so the tail is never scheduled yet.
                victim = self._running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled[seq.request_id] = ScheduledSeq(seq, num_new)
                budget -= num_new
                if chunk_capped:
                    capped_left -= num_new
                i += 1

        # Then waiting seqs, best first, while there is budget. After a preemption for blocks they are
        # scarce, so admit nothing new unless the step would otherwise be empty.
        admit = not preempted or not scheduled
        while admit and self._waiting and budget > 0:
            seq = self._waiting[0][1]
            if cutoff is not None and seq.priority > cutoff:
                break
            if seq in preempted:  # just evicted for a better seq: taking it back now would thrash
                break
            chunk_capped = capped(seq)
            if chunk_capped and capped_left <= 0:  # the heap is sorted: the rest are capped too
                break
            if bm.blocks_needed(seq.num_tokens) > bm.num_blocks:
                # Could never fit even in an empty cache: waiting would block the queue forever.
                self.finish(seq, "error")
                rejected.append(seq)
                continue
            if len(self._running) >= self.config.max_num_seqs:
                # Every slot is taken: a better seq takes the worst running seq's slot (an interactive
                # request does not wait for a batch line to finish); an equal or worse one waits.
                if self._running[-1].priority <= seq.priority:
                    break
                budget += self._evict_worst(scheduled, preempted)
            if not seq.block_table and seq.num_computed_tokens == 0:
                bm.get_computed_blocks(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if chunk_capped:
                num_new = min(num_new, capped_left)
            admitted = bm.allocate_slots(seq, num_new)
            while not admitted and self._running and self._running[-1].priority > seq.priority:
                # Priority beats seniority for blocks too.
                budget += self._evict_worst(scheduled, preempted)
                admitted = bm.allocate_slots(seq, num_new)
            if not admitted and not self._running and self._release_waiting_blocks(seq):
                admitted = bm.allocate_slots(seq, num_new)
            if not admitted:
                bm.free(seq)  # undo the prefix-cache hit; it is looked up again next step
                break
            heapq.heappop(self._waiting)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self._running, seq, key=lambda s: s.sort_key)
            scheduled[seq.request_id] = ScheduledSeq(seq, num_new)
            budget -= num_new
            if chunk_capped:
                capped_left -= num_new

        # The runner lays out decodes first, so they form one contiguous (CUDA-graph friendly) batch, and
        # longest context first: attention runs a program per decode in batch order, so the step then ends
        # on short sequences rather than on a few long ones while the other SMs idle.
        items = list(scheduled.values())
        decodes = sorted((s for s in items if s.is_decode), key=lambda s: -s.seq.num_tokens)
        prefills = [s for s in items if not s.is_decode]
        return SchedulerOutput(
            scheduled=decodes + prefills,
            preempted=preempted,
            num_batched_tokens=sum(s.num_new_tokens for s in items),
            rejected=rejected,
        )

    def _release_waiting_blocks(self, head: Sequence) -> bool:
        """Nothing runs and the queue's head does not fit: blocks that other waiting seqs hold (a request's
        other choices hold their prompt's shared blocks from the fork on) go back, as a preemption would
        take them, or no step would ever free them. Returns whether any went back."""
        released = False
        for _, seq in self._waiting:
            if seq is not head and seq.block_table:
                self.block_manager.free(seq)
                released = True
        return released

    def _reserve_for_better(self) -> dict[int, int]:
        """For each running priority, the tokens that waiting seqs of a better priority need (at most): what
        running prefill chunks of that priority leave them. Empty when nothing better waits."""
        if self.better_arrival() is None:
            return {}
        need: dict[int, int] = {}
        for _, seq in self._waiting:
            need[seq.priority] = need.get(seq.priority, 0) + seq.num_tokens - seq.num_computed_tokens
        return {p: sum(n for q, n in need.items() if q < p) for p in {s.priority for s in self._running}}

    def _evict_worst(self, scheduled: dict[str, ScheduledSeq], preempted: list[Sequence]) -> int:
        """Preempt the worst running seq (lowest priority, newest), even one scheduled this step; returns
        the tokens of this step's budget it gives back."""
        victim = self._running[-1]
        gone = scheduled.pop(victim.request_id, None)
        self._preempt(victim)
        preempted.append(victim)
        return gone.num_new_tokens if gone is not None else 0

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Record the KV the step computed and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
