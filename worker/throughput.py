"""Recent throughput of this worker from its own counters: tokens per second for the heartbeat (which
`tokenq status` reads) and one log line at a steady interval, so an operator sees the rate without Prometheus."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import REGISTRY

from tokenq.logs import get_logger
from tokenq.settings import Settings

WINDOW_S = 10.0  # rates are averaged over this long, so a 2 s heartbeat does not jump with each finish
_SERIES = {"prompt": "tokenq_worker_prompt_tokens_total", "generation": "tokenq_worker_generation_tokens_total"}

log = get_logger("throughput")


class Throughput:
    def __init__(self, model: str, log_every_s: float | None = None) -> None:
        self.model = model
        self.log_every_s = Settings.from_env().throughput_log_s if log_every_s is None else log_every_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._last_log = time.monotonic()

    def _totals(self) -> dict[str, float]:
        return {k: REGISTRY.get_sample_value(name, {"model": self.model}) or 0.0 for k, name in _SERIES.items()}

    def sample(self, now: float | None = None) -> dict[str, float]:
        """Tokens per second (prompt and generation) over the last WINDOW_S, plus the generation total."""
        now = time.monotonic() if now is None else now
        totals = self._totals()
        self._samples.append((now, totals))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        t0, first = self._samples[0]
        dt = now - t0
        rates = {f"{k}_tokens_per_s": (totals[k] - first[k]) / dt if dt > 0 else 0.0 for k in _SERIES}
        return {**rates, "generation_tokens": totals["generation"]}

    def maybe_log(self, rates: dict[str, float], stats: dict, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.log_every_s <= 0 or now - self._last_log < self.log_every_s:
            return False
        self._last_log = now
        busy = any((rates["prompt_tokens_per_s"], rates["generation_tokens_per_s"], stats.get("running", 0),
                    stats.get("waiting", 0)))
        # An idle worker's line of zeros every period is noise: debug then (as vLLM's stat logger).
        (log.info if busy else log.debug)(
            "throughput", model=self.model, prompt_tokens_per_s=round(rates["prompt_tokens_per_s"], 1),
            generation_tokens_per_s=round(rates["generation_tokens_per_s"], 1),
            running=stats.get("running", 0), waiting=stats.get("waiting", 0),
            kv_cache_usage=round(float(stats.get("kv_usage", 0.0)), 3))
        return True
