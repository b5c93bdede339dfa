"""When to try a webhook again: a fixed backoff schedule (a day and more in all), stretched by a
receiver's Retry-After, and which answers are worth retrying at all."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, replace

from tokenq.settings import Settings

DEFAULT_GONE_DISABLE_S = 7 * 86400
# 11 attempts over about 47 hours: a receiver that is down for a whole day still gets its events.
DEFAULT_DELAYS: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...] = DEFAULT_DELAYS  # delays[n-1] follows failed attempt n
    timeout_s: float = 10.0  # per attempt: connect, send and the answer's headers
    gone_disable_s: float = DEFAULT_GONE_DISABLE_S  # after a 410, the tenant's deliveries skip the URL this long

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """`TOKENQ_WEBHOOK_RETRY_DELAYS` (comma-separated seconds) replaces the schedule, e.g. in tests;
        `TOKENQ_WEBHOOK_GONE_DISABLE_S` how long a 410 disables a URL for its tenant."""
        settings = Settings.from_env()
        policy = cls(settings.webhook_retry_delays) if settings.webhook_retry_delays is not None else cls()
        gone = settings.webhook_gone_disable_s
        return replace(policy, gone_disable_s=gone) if gone is not None else policy

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    @property
    def horizon_s(self) -> float:
        """How long a delivery may still be retried after its first attempt (Retry-After included)."""
        return sum(self.delays) + max(self.delays, default=0)

    def delay_after(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after failed attempt `attempt` (1-based), or None when it was the last one.
        A longer Retry-After wins, capped at the schedule's longest step."""
        if attempt > len(self.delays):
            return None
        delay = self.delays[attempt - 1]
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.delays)))
        return delay


def retryable(status: int) -> bool:
    """5xx and 429 may pass; other answers (3xx, 4xx) will not change by asking again."""
    return status >= 500 or status == 429


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
