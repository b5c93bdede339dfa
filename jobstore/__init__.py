"""The job's state machine in one place: the Lua scripts (scripts.py), one typed API over them (store.py),
the expiry sweep (expiry.py), and the one way to open Redis (connect.py). Key names are protocol/keys.py's,
re-exported here as `jobstore.keys`.

Redis Cluster: every key of one model's queue (its streams, lane counters, deadlines, outbox, dead letters,
its jobs' keys and channels, and the tenants' limit counters and Idempotency-Keys for that model) carries
the model's hash tag, and a job id carries it too. Every script call then touches one slot: a model's queue
lives on one node, models spread over the nodes, and tenant limits count per model (docs/redis-cluster.md)."""

from jobstore.store import (
    DeltaWrite,
    FinalWrite,
    IdempotencyKey,
    JobRef,
    JobStore,
    Limits,
    Refused,
    Started,
    Submitted,
)
from protocol import keys

__all__ = ["DeltaWrite", "FinalWrite", "IdempotencyKey", "JobRef", "JobStore", "Limits", "Refused", "Started", "Submitted", "keys"]
