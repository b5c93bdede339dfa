"""tokenq's job options on every submitting route: a deadline (absolute or as a TTL), a webhook, and
whether a streaming client's disconnect cancels the job. Checked here, before anything is enqueued."""

from __future__ import annotations

import math
import re
from datetime import datetime

from gateway.errors import ApiError
from protocol.urlguard import UnsafeURL, check_webhook_url
from tokenq.settings import Settings

MAX_AHEAD_S = 3650 * 86400  # the furthest deadline, ten years: past it a number is more likely milliseconds
# RFC 3339's date-time (section 5.6): fromisoformat alone also takes ISO 8601's other forms
# (20300101T000000Z, week dates) and times without a zone.
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})")


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
    if at > now + MAX_AHEAD_S:
        unit = "" if isinstance(deadline, str) else ", in epoch seconds"  # a number: milliseconds (Date.now())?
        raise ApiError(400, f"deadline: at most {MAX_AHEAD_S // 86400} days ahead{unit} (got {deadline!r})",
                       param="deadline")
    return at


def _rfc3339(text: str) -> float:
    parsed = None
    if _RFC3339.fullmatch(text):
        try:
            parsed = datetime.fromisoformat(text.upper())  # a real date and time (no 02-30, no 25:00)
        except ValueError:
            pass
    if parsed is None:
        raise ApiError(400, "deadline: must be epoch seconds or an RFC 3339 date-time with a time zone, "
                            "YYYY-MM-DDTHH:MM:SS[.frac] then Z or ±HH:MM, like 2030-01-01T00:00:00Z "
                            f"(got {text[:64]!r})", param="deadline")
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
