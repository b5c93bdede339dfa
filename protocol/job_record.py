"""Field names of the job hash `keys.job_key(id)`, the source of truth for a job's state."""

from __future__ import annotations

import json

# The text streamed so far lives in its own string, keys.job_text_key (deltas APPEND to it); jobstore's
# reads put it under TEXT in the record they return.
TEXT = "text"
# With n > 1 that string is a log of every choice's text (protocol/choice_text.py) and the hash says n:
CHOICES = "choices"
# Every value in the hash is a string; JSON fields hold pydantic models' JSON.
STATE = "state"
TENANT = "tenant"
MODEL = "model"
LANE = "lane"
PAYLOAD = "payload"  # JobPayload JSON
REQUEST = "request"  # the client's original body JSON (for GET /v1/jobs/{id})
METADATA = "metadata"  # client metadata JSON
RESULT = "result"  # JobResult JSON, once succeeded
ERROR = "error"  # JobError JSON, once failed
SEQ = "seq"  # sequence number of the last published event
STREAMED = "streamed"  # "1" once any reader wants deltas; the worker then publishes them
CREATED_AT = "created_at"
STARTED_AT = "started_at"
FIRST_TOKEN_AT = "first_token_at"
FINISHED_AT = "finished_at"
ATTEMPTS = "attempts"
WORKER = "worker"
CANCEL_REQUESTED = "cancel_requested"  # "1": the worker running it aborts it and ends it `cancelled`
IDEMPOTENCY_KEY = "idempotency_key"
WEBHOOK_URL = "webhook_url"
WEBHOOK_ATTEMPTS = "webhook_attempts"  # JSON list of delivery attempts (time, status or error)
DEADLINE = "deadline"  # epoch seconds, when the job has one (also its score in keys.deadlines_key(model))
CACHE = "cache"  # "exact" or "semantic": answered from the response cache, never queued
CACHE_ENTRY = "cache_entry"  # the response-cache entry that answered it (DELETE /v1/cache/entries/{id})
ENTRY_ID = "entry_id"  # the job's stream entry id, so a cancel of a queued job can acknowledge it

RETENTION_SECONDS = 7 * 24 * 3600  # a final job's hash expires after this


def webhook_attempts(record: dict[str, str]) -> list[dict]:
    """The webhook delivery attempts on a job's (or batch's) hash, oldest first (worker/webhooks/attempts.py
    writes them)."""
    return json.loads(record.get(WEBHOOK_ATTEMPTS) or "[]")
