"""The job's state machine in one place: the Lua scripts (scripts.py), one typed API over them (store.py),
the expiry sweep (expiry.py). Key names are protocol/keys.py's, re-exported here as `jobstore.keys`."""

from jobstore.store import (
    DeltaWrite,
    FinalWrite,
    JobRef,
    JobStore,
    Limits,
    Refused,
    Started,
    Submitted,
)
from protocol import keys

__all__ = ["DeltaWrite", "FinalWrite", "JobRef", "JobStore", "Limits", "Refused", "Started", "Submitted", "keys"]
