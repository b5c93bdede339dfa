"""Who caches what: the request's `cache` option (a tokenq extension) and the tenant's defaults, stored
beside its limits in the tenant's settings hash (`tokenq keys create --cache-mode ...`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.numbers import Float

CacheMode = Literal["exact", "semantic", "off"]
# The verifier's match probability a semantic hit needs: the one `python -m respcache.train` chose on the
# tune split of the Quora pairs and stored in the verifier's model file (a test keeps the two equal).
DEFAULT_THRESHOLD = 0.911
# A question this near (cosine) to a cached one of its scope, and not answered by it, keeps no semantic entry
# of its own (its exact entry is kept): the verifier weighs the nearest entry against its rivals, so a
# cluster of near-identical entries would score each other down and a rewording of them all would miss.
NEAR_DUPLICATE_COSINE = 0.95
DEFAULT_TTL_S = 86400
DEFAULT_MAX_ENTRIES = 100_000
# Fields of the tenant's settings hash (protocol.keys.tenant_key).
MODE_FIELD, THRESHOLD_FIELD, TTL_FIELD, MAX_ENTRIES_FIELD = ("cache_mode", "cache_threshold", "cache_ttl",
                                                             "cache_max_entries")
FIELDS = (MODE_FIELD, THRESHOLD_FIELD, TTL_FIELD, MAX_ENTRIES_FIELD)
# The numeric fields' ranges: what the writer (`tokenq keys create`) refuses outside and the reader ignores.
RANGES: dict[str, tuple[type, float, float]] = {THRESHOLD_FIELD: (float, 0.0, 1.0), TTL_FIELD: (int, 1, 10 ** 9),
                                                MAX_ENTRIES_FIELD: (int, 1, 10 ** 9)}


def check_setting(field: str, value: float | str) -> None:
    """A ValueError naming `field` when `value` is outside its range (the mode has none here: the CLI's
    choices and the reader's fallback keep it)."""
    if field not in RANGES:
        return
    _, low, high = RANGES[field]
    if not low <= value <= high:
        raise ValueError(f"{field}: {low:,} to {high:,}, got {value}")


class CacheOption(BaseModel):
    """The request's `cache` field: `mode` overrides the tenant's default; `threshold` may only tighten the
    tenant's (a lower one is raised to it)."""

    model_config = ConfigDict(extra="forbid")

    mode: CacheMode | None = None
    threshold: Float | None = Field(default=None, ge=0.0, le=1.0)


@dataclass(frozen=True)
class TenantCachePolicy:
    mode: CacheMode = "off"
    threshold: float = DEFAULT_THRESHOLD
    ttl_s: int = DEFAULT_TTL_S
    max_entries: int = DEFAULT_MAX_ENTRIES

    @classmethod
    def from_fields(cls, values: list[str | None]) -> TenantCachePolicy:
        """From the settings hash's FIELDS (HMGET order); a missing or bad value keeps the default."""
        mode, threshold, ttl, bound = values
        policy = cls()
        return cls(mode=mode if mode in ("exact", "semantic", "off") else policy.mode,  # type: ignore[arg-type]
                   threshold=_number(threshold, THRESHOLD_FIELD, policy.threshold),
                   ttl_s=_number(ttl, TTL_FIELD, policy.ttl_s),
                   max_entries=_number(bound, MAX_ENTRIES_FIELD, policy.max_entries))


def _number(raw: str | None, field: str, default):
    kind, low, high = RANGES[field]
    try:
        value = kind(raw) if raw not in (None, "") else default
    except ValueError:
        return default
    return value if low <= value <= high else default


@dataclass(frozen=True)
class Decision:
    """How one request uses the cache: never `off` (that request is not looked up at all)."""

    mode: CacheMode  # "exact" or "semantic" (which looks up the exact entry first)
    threshold: float
    ttl_s: int
    max_entries: int


def decide(policy: TenantCachePolicy, option: CacheOption | None, deterministic: bool) -> Decision | None:
    """The request's cache use, or None: caching is off, or the answer is not determined by the request
    (sampled with temperature > 0 and no seed)."""
    mode = option.mode if option is not None and option.mode is not None else policy.mode
    if mode == "off" or not deterministic:
        return None
    threshold = policy.threshold
    if option is not None and option.threshold is not None:
        threshold = max(threshold, option.threshold)
    return Decision(mode, threshold, policy.ttl_s, policy.max_entries)
