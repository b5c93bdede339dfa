"""Redis key, stream and channel names, in one place so gateway and worker never drift apart."""

from __future__ import annotations

PREFIX = "tokenq"
GROUP = "workers"  # consumer group on every job stream

# Highest priority first: intake reads lanes in this order.
LANES: tuple[str, ...] = ("interactive", "default", "batch")
LANE_PRIORITY: dict[str, int] = {lane: i for i, lane in enumerate(LANES)}

WORKERS_SET = f"{PREFIX}:workers"  # set of worker ids that have heartbeated
# Every model a worker has ever served (heartbeats add to it; it never expires): such a model is accepted,
# and its jobs wait, while no worker of it is live.
MODELS_SET = f"{PREFIX}:models"
# Sorted set of job ids by deadline (epoch seconds): the expiry sweep reads the ones that are due.
DEADLINES = f"{PREFIX}:deadlines"
DEAD_STREAM = f"{PREFIX}:dead"
# Entries {job_id, state} added by the first final write of a job that names a webhook; the webhook
# service relays each to an arq delivery job.
WEBHOOK_OUTBOX = f"{PREFIX}:webhooks:outbox"


def jobs_stream(model: str, lane: str, tenant: str) -> str:
    """One stream per (model, lane, tenant), so that a tenant with a deep backlog cannot starve others:
    workers read the tenants of a lane round-robin."""
    return f"{PREFIX}:jobs:{model}:{lane}:{tenant}"


def lane_tenants_key(model: str, lane: str) -> str:
    """Set of the tenants that have a stream on this (model, lane); submit adds to it in its MULTI."""
    return f"{PREFIX}:lane:{model}:{lane}:tenants"


def new_tenants_stream(model: str) -> str:
    """Stream: an entry when a tenant's first job opens a new stream on one of the model's lanes, read by
    the workers' blocking reads beside the lanes, so that a worker blocked on the streams it knows looks
    for the new one at once instead of at its next periodic refresh."""
    return f"{PREFIX}:lanes:{model}:new-tenants"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_text_key(job_id: str) -> str:
    """The text streamed so far, a string of its own so that each delta is one APPEND."""
    return f"{PREFIX}:job:{job_id}:text"


def lane_depth_key(model: str, lane: str) -> str:
    """Hash tenant -> the tenant's jobs queued or running on this (model, lane): the lane's depth, kept by
    the submit and finish scripts (a tenant's field goes when it reaches 0)."""
    return f"{PREFIX}:lane:{model}:{lane}:depth"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def model_card_key(model: str) -> str:
    """Hash a worker writes on start: tokenizer, chat template, context length (the gateway reads it)."""
    return f"{PREFIX}:model:{model}"


MODEL_CARD_FIELD = "card"  # the model hash's field with the whole ModelCard JSON
MODEL_CARD_DIGEST_FIELD = "digest"  # its sha256, so a gateway rechecks a card it holds without reading MBs


def idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


# Control messages to every worker (JSON {"cancel": job_id}); at-most-once, so workers also poll
# the job hash's `cancel_requested` field for the jobs they run.
CONTROL_CHANNEL = f"{PREFIX}:control"


def api_key_key(key_sha256: str) -> str:
    """Hash of an API key → {tenant, created_at}; keys are stored only as SHA-256 digests."""
    return f"{PREFIX}:apikey:{key_sha256}"


def tenant_key(tenant: str) -> str:
    """Hash of a tenant's settings: webhook_secret, rpm, tpm, max_queued."""
    return f"{PREFIX}:tenant:{tenant}"


def tenant_queued_key(tenant: str) -> str:
    """Counter of a tenant's jobs that are queued or running (incremented at submit, decremented at final)."""
    return f"{PREFIX}:tenant:{tenant}:queued"


def webhook_endpoint_key(tenant: str, url_sha256: str) -> str:
    """Set (with an expiry) when an endpoint answered 410 Gone to this tenant's delivery: the tenant's
    deliveries to it are skipped until then."""
    return f"{PREFIX}:webhook:disabled:{tenant}:{url_sha256}"
