"""Redis names of the response caches. Every entry key carries its tenant, so no lookup can reach
another tenant's entries."""

from __future__ import annotations

import re

from protocol.keys import PREFIX

ROOT = f"{PREFIX}:rcache"
# Stream of semantic entries added and removed, tailed by every gateway to keep its vector index in step.
LOG_STREAM = f"{ROOT}:log"
LOG_MAXLEN = 500_000


ENTRY_ID = re.compile(r"[xs]:[0-9a-f]{64}")  # as a hit's x-tokenq-cache-entry header names an entry
ENTRY_ID_RULE = "'x:' or 's:' and 64 hex digits, as a hit's x-tokenq-cache-entry header gives it"


def entry_key(tenant: str, entry_id: str) -> str:
    """One cached answer; `entry_id` is `x:<sha256>` (exact) or `s:<sha256>` (semantic)."""
    return f"{ROOT}:{tenant}:{entry_id}"


def index_key(tenant: str) -> str:
    """Sorted set of the tenant's entry ids by expiry time: the bound evicts the soonest to expire."""
    return f"{ROOT}:{tenant}:entries"


def index_pattern() -> str:
    return f"{ROOT}:*:entries"


def pending_key(job_id: str) -> str:
    """What the worker writes into the cache once this job succeeds (set by the gateway on a miss)."""
    return f"{ROOT}:pending:{job_id}"
