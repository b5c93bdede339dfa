"""tokenq's job options on every submitting route: a deadline (absolute or as a TTL), a webhook, and
whether a streaming client's disconnect cancels the job. Checked here, before anything is enqueued."""

from __future__ import annotations

import math
from datetime import datetime

from gateway.errors import ApiError
from protocol.urlguard import UnsafeURL, check_webhook_url
from tokenq.settings import Settings

MAX_AHEAD_S = 3650 * 86400  # the furthest deadline, ten years: past it a number is more likely milliseconds


def parse_deadline(deadline: float | str | None, ttl: float | None, now: float) -> float | None:
    """Epoch seconds the job must be done by, or None; 400 naming the field when it is unusable."""
    if deadline is not None and ttl is not None:
        raise ApiError(400, "give at most one of `deadline` and `ttl`", param="deadline")
    if ttl is not None:
        if not math.isfinite(ttl) or not 0 < ttl <= MAX_AHEAD_S:
            raise ApiError(400, f"ttl: a positive number of seconds, at most {MAX_AHEAD_S} (got {ttl!r})",
                           param="ttl")
        return now + ttl
    if deadline is None:
        return None
    if isinstance(deadline, str):
        at = _rfc3339(deadline)
    else:
        at = float(deadline)
        if not math.isfinite(at):
            raise ApiError(400, f"deadline: must be epoch seconds or RFC 3339 (got {deadline!r})",
                           param="deadline")
    if at <= now:
        raise ApiError(400, f"deadline: {deadline!r} is in the past", param="deadline")
    if not isinstance(deadline, str) and at > now + MAX_AHEAD_S:  # milliseconds (JavaScript's Date.now())?
        raise ApiError(400, f"deadline: at most {MAX_AHEAD_S // 86400} days ahead, in epoch seconds (got "
                            f"{deadline!r})", param="deadline")
    return at


def _rfc3339(text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
        raise ApiError(400, f"deadline: must be epoch seconds or an RFC 3339 time with a zone, like "
                            f"2030-01-01T00:00:00Z (got {text[:64]!r})", param="deadline")
    return parsed.timestamp()


def check_webhook(url: str | None) -> str | None:
    """The URL when tokenq may deliver to it (TOKENQ_WEBHOOK_ALLOW opens private hosts), else 400."""
    if url is None:
        return None
    try:
        check_webhook_url(url, "")
        return url  # a public host: no allow-list to read, so no Settings parse on the submit path
    except UnsafeURL:
        pass
    try:
        check_webhook_url(url, Settings.from_env().webhook_allow)
    except UnsafeURL as e:
        raise ApiError(400, f"webhook_url: {e}", param="webhook_url") from e
    return url
