"""The submission path every submitting route shares: prepare the job, look it up in the response cache
(a hit is written as a succeeded job and never queued), then admit and write it in one jobstore script
(limits, the lane's fair share, Idempotency-Key). A repeated Idempotency-Key gives the first job."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.admission import idempotency_of, limit_error, limits_of, too_large
from gateway.auth import Tenant
from gateway.context import GatewayContext
from gateway.errors import ApiError
from gateway.jobs import read_job
from gateway.logging import bind_job
from gateway.prepare import prepare
from gateway.response_cache import ENTRY_HEADER, HEADER, Hit, write_hit
from gateway.schemas import ChatCompletionRequest, CompletionRequest, JobCreate, dump_request
from jobstore import IdempotencyKey, JobRef, Refused
from protocol import job_record as F
from protocol.jobs import JobPayload, JobState, Lane
from respcache.policy import Decision
from tokenq.logs import get_logger

log = get_logger(__name__)
_SUBMIT_TRIES = 3  # a repeat whose first job's last client left meanwhile submits again

@dataclass(frozen=True)
class Enqueued:
    payload: JobPayload
    created_at: float
    record: dict[str, str] | None = None  # the first job's hash (a repeat), or the hit's (cache)
    hit: Hit | None = None  # answered from the response cache
    attached: bool = False  # a repeat counted among the job's waiting clients (jobstore's ATTACH)

    @property
    def cache(self) -> str | None:
        """"exact" or "semantic" when the response cache answered the job: this request's hit, or the one the
        first request of a repeated Idempotency-Key got (a hit's job hash says so)."""
        return self.record.get(F.CACHE) if self.record is not None else None

    @property
    def cache_entry(self) -> str | None:
        return self.record.get(F.CACHE_ENTRY) if self.record is not None else None

    @property
    def cache_headers(self) -> dict[str, str]:
        """A hit's response headers: which cache answered, and with which entry."""
        return {HEADER: self.cache, ENTRY_HEADER: self.cache_entry or ""} if self.cache is not None else {}

    @property
    def repeat(self) -> bool:
        return self.record is not None and self.hit is None

    @property
    def queued_here(self) -> bool:
        """This request queued the job: not a repeat's first job, not a cache hit (both come with a record)."""
        return self.record is None


async def enqueue(ctx: GatewayContext, tenant: Tenant,
                  body: ChatCompletionRequest | CompletionRequest | JobCreate, lane: Lane, stream: bool,
                  metadata: dict[str, str], idempotency_key: str | None) -> Enqueued:
    decision = await ctx.cache.decide(tenant.name, body.cache)
    payload = await prepare(ctx.registry, body, lane, stream, tenant.name)
    return await submit(ctx, tenant, body, payload, decision, metadata, idempotency_of(idempotency_key, body))


async def submit(ctx: GatewayContext, tenant: Tenant, body: ChatCompletionRequest | CompletionRequest | JobCreate,
                 payload: JobPayload, decision: Decision | None, metadata: dict[str, str],
                 idempotency: IdempotencyKey | None) -> Enqueued:
    """A prepared job: answered from the response cache, or admitted and written."""
    stream = payload.stream
    lookup = None
    digest = ctx.registry.card_digest(payload.model)
    if decision is not None and digest is not None:
        lookup = await ctx.cache.lookup(decision, payload, digest, body)
        if lookup is not None and lookup.hit is not None:
            return await _cached(ctx, tenant, body, payload, metadata, lookup.hit, idempotency)
    if (error := too_large(tenant, payload.cost_tokens)) is not None:  # a hit above costs no tokens
        raise error
    if lookup is not None:
        payload.cache_fill = True
        await ctx.cache.expect(payload.id, lookup)
    # A completion waits on its job, and its client leaving cancels it: a repeat of its key waits beside it.
    waits = not isinstance(body, JobCreate) and not payload.run_to_completion
    for _ in range(_SUBMIT_TRIES):
        try:
            submitted = await ctx.store.submit(payload, dump_request(body), metadata, streamed=stream,
                                               limits=limits_of(tenant, ctx.max_queue_depth),
                                               idempotency=idempotency)
        except Refused as refused:
            raise _refusal(ctx, tenant, payload, refused) from None
        if not (submitted.repeat and idempotency is not None):
            break
        first = await _first_job(ctx, tenant.name, idempotency, payload, submitted.job_id, waits)
        if first is not None:
            return first
    else:
        raise ApiError(409, "the job this Idempotency-Key was used for is being cancelled; retry the request",
                       param="Idempotency-Key", code="idempotency_key_in_use")
    bind_job(payload.id)
    ctx.metrics.jobs_enqueued.labels(payload.model, payload.lane).inc()
    log.debug("job enqueued", model=payload.model, lane=payload.lane, kind=payload.kind,
              prompt_tokens=len(payload.prompt_token_ids), stream=stream, tenant=tenant.name)
    return Enqueued(payload, submitted.created_at)


async def _cached(ctx: GatewayContext, tenant: Tenant, body: ChatCompletionRequest | CompletionRequest | JobCreate,
                  payload: JobPayload, metadata: dict[str, str], hit: Hit,
                  idempotency: IdempotencyKey | None) -> Enqueued:
    """A hit generates nothing and takes no queue place: it counts against the tenant's requests per minute
    only, not its tokens or its queued jobs."""
    bind_job(payload.id)
    try:
        holder, record = await write_hit(ctx.store, payload, dump_request(body), metadata, hit, idempotency,
                                         rpm=tenant.rpm)
    except Refused as refused:
        raise _refusal(ctx, tenant, payload, refused) from None
    if holder != payload.id and idempotency is not None:
        first = await _first_job(ctx, tenant.name, idempotency, payload, holder, waits=False)
        assert first is not None  # only a repeat that waits is sent to submit again
        return first
    log.debug("answered from the response cache", cache=hit.kind, model=payload.model, tenant=tenant.name)
    return Enqueued(payload, float(record[F.CREATED_AT]), record, hit=hit)


def _refusal(ctx: GatewayContext, tenant: Tenant, payload: JobPayload, refused: Refused) -> ApiError:
    return limit_error(tenant, refused, payload.cost_tokens, payload.model, payload.lane, ctx.max_queue_depth)


async def _first_job(ctx: GatewayContext, tenant: str, idempotency: IdempotencyKey, asked: JobPayload,
                     job_id: str, waits: bool) -> Enqueued | None:
    """The job a repeated key maps to (written in the same script that bound the key). If it is gone
    (evicted), the key is released so that the client's next retry goes through. A repeat that carries
    another request (any field changed, or another route) is refused, as the IETF's Idempotency-Key draft
    and Stripe refuse it: answering it with the first job would hide the change from the client. A
    completion's repeat (`waits`) waits beside the first client; None when that client left meanwhile and
    the job is being cancelled (submit again: its key is free)."""
    bind_job(job_id)
    record = await read_job(ctx.store, job_id)
    if record is not None and record.get(F.PAYLOAD):
        payload = JobPayload.model_validate_json(record[F.PAYLOAD])
        if record.get(F.REQUEST_DIGEST, idempotency.request_digest) != idempotency.request_digest \
                or payload.kind != asked.kind:  # a hash written before digests were kept has its kind only
            raise ApiError(422, f"this Idempotency-Key was used with another request (job {job_id}): a retry "
                                "must send the same request; use a new key for a new one",
                           param="Idempotency-Key", code="idempotency_key_reused")
        attached = False
        if waits and not JobState(record.get(F.STATE) or JobState.queued.value).final:
            outcome = await ctx.store.attach(JobRef.of(payload), idempotency.key)
            if outcome < 0:
                return None
            attached = outcome == 1
        log.info("idempotent repeat", first_job=job_id)
        return Enqueued(payload, float(record.get(F.CREATED_AT) or 0), record, attached=attached)
    await ctx.store.release_idempotency_key(tenant, idempotency.key, asked.model, job_id)
    raise ApiError(409, "the job this Idempotency-Key was used for is gone; retry the request",
                   param="Idempotency-Key", code="idempotency_key_in_use")


def job_created_body(job: Enqueued, metadata: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/jobs's 202 body; a repeat gets the first job's body with its current status."""
    payload = job.payload
    status = job.record.get(F.STATE, "queued") if job.record is not None else "queued"
    if job.record is not None and job.record.get(F.METADATA):
        metadata = json.loads(job.record[F.METADATA])
    body = {"id": payload.id, "object": "job", "status": status, "model": payload.model, "kind": payload.kind,
            "priority": payload.lane, "created_at": int(job.created_at), "metadata": metadata,
            "prompt_tokens": len(payload.prompt_token_ids)}
    if job.cache is not None:
        body["cache"] = job.cache
        body["cache_entry"] = job.cache_entry
    return body
