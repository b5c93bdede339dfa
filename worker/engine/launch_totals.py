"""Lifetime counts of the steps an engine launched: how many, how many carried prefill, and their tokens.

Two runs of the same load that differ in speed differ either in these (the arrivals cut the work into other
steps) or in the time each step took; the worker exports them as counters (worker/metrics.py) and
`tokenq bench serve` sets the served phase's against the offline run's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from worker.engine.scheduler import SchedulerOutput


@dataclass
class LaunchTotals:
    steps: int = 0
    prefill_steps: int = 0  # steps with at least one prompt chunk
    step_tokens: int = 0  # prompt and output tokens the steps computed

    def count(self, sched: SchedulerOutput) -> None:
        """One launched step (`sched.scheduled` is not empty)."""
        self.steps += 1
        self.step_tokens += sched.num_batched_tokens
        if not sched.scheduled[-1].is_decode:  # decodes come first: a prompt chunk, if any, is last
            self.prefill_steps += 1

    def totals(self) -> dict[str, int]:
        return asdict(self)

    def as_stats(self) -> dict[str, int]:
        return {f"launched_{k}": v for k, v in self.totals().items()}
