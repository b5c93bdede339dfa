"""The submission path every submitting route shares: prepare the job, check the lane's depth, admit it
for its tenant (limits, Idempotency-Key), then write it. A repeated Idempotency-Key gives the first job."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from gateway.auth import Tenant
from gateway.context import GatewayContext
from gateway.errors import ApiError
from gateway.jobs import read_job, submit
from gateway.logging import bind_job, get_logger
from gateway.prepare import prepare
from gateway.schemas import ChatCompletionRequest, CompletionRequest, JobCreate, dump_request
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobPayload, Lane

log = get_logger(__name__)

FIRST_JOB_WAIT_S = 2.0  # how long a repeat waits for the first request to finish writing its job

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class Enqueued:
    payload: JobPayload
    created_at: float
    record: dict[str, str] | None = None  # the first job's hash, when this request was a repeat

    @property
    def repeat(self) -> bool:
        return self.record is not None


async def enqueue(ctx: GatewayContext, tenant: Tenant,
                  body: ChatCompletionRequest | CompletionRequest | JobCreate, lane: Lane, stream: bool,
                  metadata: dict[str, str], idempotency_key: str | None) -> Enqueued:
    payload = await prepare(ctx.registry, body, lane, stream, tenant.name)
    await ctx.depth.check(payload.model, payload.lane)
    tokens = len(payload.prompt_token_ids) + payload.sampling.max_tokens
    first = await ctx.admission.admit(tenant, payload.id, tokens, idempotency_key)
    if first is not None:
        return await _first_job(ctx, tenant.name, idempotency_key or "", first)
    bind_job(payload.id)
    created = await submit(ctx.pipe, payload, dump_request(body), metadata, streamed=stream,
                           idempotency_key=idempotency_key)
    ctx.metrics.jobs_enqueued.labels(payload.model, payload.lane).inc()
    log.debug("job enqueued", model=payload.model, lane=payload.lane, kind=payload.kind,
              prompt_tokens=len(payload.prompt_token_ids), stream=stream, tenant=tenant.name)
    return Enqueued(payload, created)


async def _first_job(ctx: GatewayContext, tenant: str, idempotency_key: str, job_id: str) -> Enqueued:
    """The job a repeated key maps to. Its request may still be writing it; if it never does (it failed
    between admission and submit), the key is released so that the client's next retry goes through."""
    bind_job(job_id)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + FIRST_JOB_WAIT_S
    while True:
        record = await read_job(ctx.redis, job_id)
        if record is not None and record.get(F.PAYLOAD):
            payload = JobPayload.model_validate_json(record[F.PAYLOAD])
            log.info("idempotent repeat", first_job=job_id)
            return Enqueued(payload, float(record.get(F.CREATED_AT) or 0), record)
        if loop.time() >= give_up:
            break
        await asyncio.sleep(0.05)
    await ctx.redis.eval(_RELEASE_LUA, 1, keys.idem_key(tenant, idempotency_key), job_id)
    raise ApiError(409, "a request with this Idempotency-Key did not finish creating its job; retry it",
                   param="Idempotency-Key", code="idempotency_key_in_use")


def job_created_body(job: Enqueued, metadata: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/jobs's 202 body; a repeat gets the first job's body with its current status."""
    payload = job.payload
    status = job.record.get(F.STATE, "queued") if job.record is not None else "queued"
    if job.record is not None and job.record.get(F.METADATA):
        metadata = json.loads(job.record[F.METADATA])
    return {"id": payload.id, "object": "job", "status": status, "model": payload.model, "kind": payload.kind,
            "priority": payload.lane, "created_at": int(job.created_at), "metadata": metadata,
            "prompt_tokens": len(payload.prompt_token_ids)}
