"""Redis key, stream and channel names, in one place so gateway and worker never drift apart.

Every key of one model's queue carries that model's hash tag (`{<shard>}`, see `shard`): its streams,
lane counters, deadlines, outbox and dead letters, its jobs' hashes, texts and event channels, and the
tenants' limit counters and Idempotency-Keys for that model. Every script of the job store then touches
one Redis Cluster slot: a model's queue lives on one node, and models spread over the nodes. A job id
carries its shard (`job_<shard>_<hex>`), so the id alone names the slot of the job's keys."""

from __future__ import annotations

import functools
import hashlib

PREFIX = "tokenq"
SHARD_HEX = 4  # 65,536 tags over 16,384 slots: models spread evenly; two models that share a tag share a slot
GROUP = "workers"  # consumer group on every job stream

# Highest priority first: intake reads lanes in this order.
LANES: tuple[str, ...] = ("interactive", "default", "batch")
LANE_PRIORITY: dict[str, int] = {lane: i for i, lane in enumerate(LANES)}

WORKERS_SET = f"{PREFIX}:workers"  # set of worker ids that have heartbeated
# Every model a worker has ever served (heartbeats add to it; it never expires): such a model is accepted,
# and its jobs wait, while no worker of it is live.
MODELS_SET = f"{PREFIX}:models"
# Entries {batch_id, state} added when a batch that names a webhook ends (jobs have one outbox per model,
# `webhook_outbox`); the webhook service relays each to an arq delivery job.
WEBHOOK_OUTBOX = f"{PREFIX}:webhooks:outbox"


@functools.lru_cache(maxsize=4096)
def shard(model: str) -> str:
    """The hash tag of `model`'s queue: a short digest, so that a job id can carry it."""
    return hashlib.sha1(model.encode()).hexdigest()[:SHARD_HEX]


def new_job_id(model: str, unique: str) -> str:
    """A job id that carries its model's shard; `unique` makes it unique (hex, or a batch's line)."""
    return f"job_{shard(model)}_{unique}"


def job_shard(job_id: str) -> str | None:
    """The shard a job id carries; None for an id without one (or not a job id at all)."""
    parts = job_id.split("_", 2)
    if len(parts) == 3 and parts[0] == "job" and len(parts[1]) == SHARD_HEX:
        return parts[1]
    return None


def _queue(model: str) -> str:
    return f"{PREFIX}:{{{shard(model)}}}"


def _job(job_id: str) -> str:
    """A job's keys share one tag: its shard, or (an id without one: a job that cannot exist) the id."""
    return f"{PREFIX}:{{{job_shard(job_id) or job_id}}}:job:{job_id}"


def deadlines_key(model: str) -> str:
    """Sorted set of the model's job ids by deadline (epoch seconds): the expiry sweep reads the due ones."""
    return f"{_queue(model)}:deadlines:{model}"


def dead_stream(model: str) -> str:
    return f"{_queue(model)}:dead:{model}"


def webhook_outbox(model: str) -> str:
    """Entries {job_id, state} added by the first final write of a job of `model` that names a webhook;
    the webhook service relays each to an arq delivery job."""
    return f"{_queue(model)}:webhooks:outbox:{model}"


def jobs_stream(model: str, lane: str, tenant: str) -> str:
    """One stream per (model, lane, tenant), so that a tenant with a deep backlog cannot starve others:
    workers read the tenants of a lane round-robin."""
    return f"{_queue(model)}:jobs:{model}:{lane}:{tenant}"


def lane_tenants_key(model: str, lane: str) -> str:
    """Set of the tenants that have a stream on this (model, lane); the submit script adds to it."""
    return f"{_queue(model)}:lane:{model}:{lane}:tenants"


def new_tenants_stream(model: str) -> str:
    """Stream: an entry when a tenant's first job opens a new stream on one of the model's lanes, read by
    the workers' blocking reads beside the lanes, so that a worker blocked on the streams it knows looks
    for the new one at once instead of at its next periodic refresh."""
    return f"{_queue(model)}:lanes:{model}:new-tenants"


def job_key(job_id: str) -> str:
    return _job(job_id)


def job_text_key(job_id: str) -> str:
    """The text streamed so far, a string of its own so that each delta is one APPEND."""
    return f"{_job(job_id)}:text"


def lane_depth_key(model: str, lane: str) -> str:
    """Hash tenant -> the tenant's jobs queued or running on this (model, lane): the lane's depth, kept by
    the submit and finish scripts (a tenant's field goes when it reaches 0)."""
    return f"{_queue(model)}:lane:{model}:{lane}:depth"


EVENTS_SUFFIX = ":events"


def events_channel(job_id: str) -> str:
    """The job's events: its hash's key and a suffix (a shard channel on a cluster: SPUBLISH, SSUBSCRIBE)."""
    return _job(job_id) + EVENTS_SUFFIX


def job_keys_pattern(unique: str = "*") -> str:
    """A SCAN pattern over the keys of the jobs of any shard whose id ends in `unique` (a glob)."""
    return f"{PREFIX}:{{*}}:job:job_*_{unique}"


def events_pattern(unique: str) -> str:
    """A PSUBSCRIBE pattern over the events of the jobs of any shard whose id ends in `unique` (a glob)."""
    return job_keys_pattern(unique) + EVENTS_SUFFIX


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def model_card_key(model: str) -> str:
    """Hash a worker writes on start: tokenizer, chat template, context length (the gateway reads it)."""
    return f"{PREFIX}:model:{model}"


MODEL_CARD_FIELD = "card"  # the model hash's field with the whole ModelCard JSON
MODEL_CARD_DIGEST_FIELD = "digest"  # its sha256, so a gateway rechecks a card it holds without reading MBs


def idem_key(tenant: str, key: str, model: str) -> str:
    """An Idempotency-Key binds within one model's queue (the submit script's slot)."""
    return f"{_queue(model)}:idem:{tenant}:{model}:{key}"


def control_channel(model: str) -> str:
    """Control messages to the model's workers (JSON {"cancel": job_id}); at-most-once, so workers also poll
    the job hash's `cancel_requested` field for the jobs they run."""
    return f"{_queue(model)}:control:{model}"


def api_key_key(key_sha256: str) -> str:
    """Hash of an API key → {tenant, created_at}; keys are stored only as SHA-256 digests."""
    return f"{PREFIX}:apikey:{key_sha256}"


def tenant_key(tenant: str) -> str:
    """Hash of a tenant's settings: webhook_secret, rpm, tpm, max_queued."""
    return f"{PREFIX}:tenant:{tenant}"


def tenant_queued_key(tenant: str, model: str) -> str:
    """Counter of a tenant's jobs of `model` that are queued or running (incremented at submit, decremented
    at final): `max_queued` holds per model, as every limit counter does."""
    return f"{_queue(model)}:tenant:{tenant}:{model}:queued"


def tenant_counter_key(tenant: str, model: str, limit: str, minute: int) -> str:
    """A tenant's rpm or tpm count for `model` in one minute."""
    return f"{_queue(model)}:tenant:{tenant}:{model}:{limit}:{minute}"


def webhook_endpoint_key(tenant: str, url_sha256: str) -> str:
    """Set (with an expiry) when an endpoint answered 410 Gone to this tenant's delivery: the tenant's
    deliveries to it are skipped until then."""
    return f"{PREFIX}:webhook:disabled:{tenant}:{url_sha256}"
