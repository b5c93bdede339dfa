"""Stream entries as intake reads them, whichever client brought the reply."""

from __future__ import annotations

from worker.intake import entry_fields


def test_entry_fields_from_either_reply():
    assert entry_fields(["job_id", "j1", "payload", "{}"]) == {"job_id": "j1", "payload": "{}"}  # raw RESP
    assert entry_fields({"job_id": "j1"}) == {"job_id": "j1"}  # redis-py's parsed reply
    assert entry_fields(None) == {}  # an entry deleted while pending
    assert entry_fields([]) == {}
