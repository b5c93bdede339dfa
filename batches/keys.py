"""Redis key names of files and batches (the job keys stay in protocol/keys.py)."""

from __future__ import annotations

from protocol.keys import PREFIX

ACTIVE_BATCHES = f"{PREFIX}:batches:active"  # set of batch ids a feeder still has work on
# Pub/sub channel: a batch id is published when the batch is created, so an idle feeder takes it at once
# (at-most-once is enough: feeders scan ACTIVE_BATCHES every poll anyway).
NEW_BATCHES = f"{PREFIX}:batches:new"


def file_key(file_id: str) -> str:
    """Hash: the file object's fields (tenant, purpose, filename, bytes, lines, created_at, expires_at)."""
    return f"{PREFIX}:file:{file_id}"


def file_lines_key(file_id: str) -> str:
    """Hash: line index (from 0) -> the line's text. A hash, not a list: a feeder reads any line in O(1)."""
    return f"{PREFIX}:file:{file_id}:lines"


def tenant_reserved_key(tenant: str) -> str:
    """Bytes of the tenant's uploads being committed now, counted against its quota until they are."""
    return f"{PREFIX}:files-reserved:{tenant}"


def tenant_files_key(tenant: str) -> str:
    """Sorted set: the tenant's file ids by created_at (listing, quota)."""
    return f"{PREFIX}:files:{tenant}"


def batch_key(batch_id: str) -> str:
    """Hash: the batch object's fields, the feed cursor and the request counts."""
    return f"{PREFIX}:batch:{batch_id}"


def tenant_batches_key(tenant: str) -> str:
    return f"{PREFIX}:batches:{tenant}"


def results_key(batch_id: str) -> str:
    """Hash: line index -> 'o' or 'e' then the line of the output or error file. Written with HSETNX: the
    first result of a line is its only one."""
    return f"{PREFIX}:batch:{batch_id}:results"


def inflight_key(batch_id: str) -> str:
    """Hash: line index -> job id, for lines fed and not yet in results."""
    return f"{PREFIX}:batch:{batch_id}:inflight"


def copies_key(batch_id: str) -> str:
    """Hash: line index -> the index of an identical deterministic line whose result it copies."""
    return f"{PREFIX}:batch:{batch_id}:copies"


def dedup_key(batch_id: str) -> str:
    """Hash: digest of a deterministic request -> the first line that runs it."""
    return f"{PREFIX}:batch:{batch_id}:dedup"


def lease_key(batch_id: str) -> str:
    """String: the feeder that owns the batch now (SET NX PX, renewed while it works)."""
    return f"{PREFIX}:batch:{batch_id}:lease"


def batch_keys(batch_id: str) -> list[str]:
    """The feeder's working keys of a batch, deleted once its files are written."""
    return [results_key(batch_id), inflight_key(batch_id), copies_key(batch_id), dedup_key(batch_id),
            lease_key(batch_id)]
