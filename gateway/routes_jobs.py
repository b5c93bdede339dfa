"""tokenq's asynchronous jobs: POST /v1/jobs, GET and DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/events."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse, Response

from gateway import responses
from gateway.admission import idempotency_key
from gateway.context import Caller, get_caller
from gateway.enqueue import enqueue, job_created_body
from gateway.errors import ApiError
from gateway.jobs import read_job
from gateway.schemas import JobCreate
from gateway.sse import RESUME_COMMENT, job_events, parse_event_id, sse_response
from jobstore import JobRef
from protocol import job_record as F
from protocol.keys import job_key

router = APIRouter()


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobCreate, caller: Caller = Depends(get_caller),
                     key: str | None = Depends(idempotency_key)) -> Response:
    job = await enqueue(caller.ctx, caller.tenant, body, body.priority, body.stream, body.metadata, key)
    headers = {**({"Idempotent-Replayed": "true"} if job.repeat else {}), **job.cache_headers} or None
    return JSONResponse(status_code=202, content=job_created_body(job, body.metadata), headers=headers)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, caller: Caller = Depends(get_caller)) -> dict:
    return responses.job_object(job_id, await _owned(caller, job_id))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, caller: Caller = Depends(get_caller)) -> dict:
    """Cancel a job: a queued one ends `cancelled` now, a running one is stopped by its worker within
    a moment (its status reads `running` until then), a final one is returned unchanged."""
    record = await _owned(caller, job_id)
    ctx = caller.ctx
    await ctx.canceller.cancel(JobRef.of_record(job_id, record))
    record = await read_job(ctx.store, job_id) or record
    return responses.job_object(job_id, record)


@router.get("/v1/jobs/{job_id}/events")
async def get_job_events(job_id: str, caller: Caller = Depends(get_caller),
                         last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
                         after: str | None = Query(default=None, alias="last_event_id")) -> Response:
    raw = last_event_id if last_event_id is not None else after
    resume = parse_event_id(raw) if raw not in (None, "") else [(0, 0)]
    if resume is None:
        raise ApiError(400, f"Last-Event-ID must be an event's id: a character offset (with its digest, as "
                            f"`128.9f3a2b1c`), or one per choice separated by commas (got {raw!r})",
                       param="Last-Event-ID")
    redis = caller.ctx.redis
    tenant, choices = await redis.hmget(job_key(job_id), [F.TENANT, F.CHOICES])
    if tenant != caller.tenant.name:
        raise _not_found(job_id)
    if len(resume) > int(choices or 1):
        raise ApiError(400, f"Last-Event-ID: {len(resume)} offsets, but the job has {int(choices or 1)} "
                            f"choice(s) (got {raw!r})", param="Last-Event-ID")
    return sse_response(job_events(redis, job_id, resume, caller.ctx.hub, caller.ctx.store), on_stop=RESUME_COMMENT)


async def _owned(caller: Caller, job_id: str) -> dict[str, str]:
    """The job's record when it exists and belongs to the caller's tenant, its deadline applied (a job
    past it reads `expired`); else 404 (not 403: another tenant's job ids are not confirmed to exist)."""
    record = await read_job(caller.ctx.store, job_id)
    if record is None or record.get(F.TENANT, "default") != caller.tenant.name:
        raise _not_found(job_id)
    return record


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job with id {job_id!r}", param="job_id", code="job_not_found")
