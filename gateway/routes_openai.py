"""OpenAI-compatible routes: POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, Response

from gateway import responses
from gateway.admission import check_idempotency_key
from gateway.auth import Tenant
from gateway.context import Caller, GatewayContext, get_caller
from gateway.enqueue import enqueue
from gateway.errors import error_response
from gateway.jobs import Final, wait_final
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.sse import completion_events, final_error, sse_response
from gateway.waiting import WaitingResponse
from jobstore import JobRef
from protocol import job_record as F
from protocol.jobs import JobPayload, JobResult, JobState

router = APIRouter()
# A completion (a client holding its connection open) submitted while no worker of its model is live waits
# this long for one to start it; a job still queued then is cancelled and the client gets a 504 saying why.
NO_WORKER_WAIT_S = 60.0
# A job that did not succeed: failed is the server's fault; cancelled and expired are outcomes the
# client asked for (DELETE, a deadline).
_FINAL_STATUS = {JobState.cancelled: 409, JobState.expired: 504}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, caller: Caller = Depends(get_caller),
                           idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")
                           ) -> Response:
    return await answer(caller.ctx, caller.tenant, body, check_idempotency_key(idempotency_key))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, caller: Caller = Depends(get_caller),
                      idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> Response:
    return await answer(caller.ctx, caller.tenant, body, check_idempotency_key(idempotency_key))


async def answer(ctx: GatewayContext, tenant: Tenant, body: ChatCompletionRequest | CompletionRequest,
                 idempotency_key: str | None) -> Response:
    """Enqueue the job and answer: an SSE stream, or a response that sends the completion once the job is
    final. Either way a client that disconnects first cancels the job (unless `run_to_completion`). The
    FastAPI routes and gateway/fastpath.py both answer with this (the key already checked)."""
    job = await enqueue(ctx, tenant, body, body.priority, body.stream, {}, idempotency_key)
    payload, created = job.payload, int(job.created_at)
    headers = job.cache_headers or None
    on_abandon = None
    if not job.repeat and not job.cache and not payload.run_to_completion:  # a client that leaves cancels its job
        def on_abandon() -> None:
            ctx.canceller.cancel_detached(JobRef.of(payload))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(completion_events(ctx.redis, payload, created, include_usage, on_abandon,
                                              mark=job.repeat, hub=ctx.hub, store=ctx.store), headers)
    if job.cache and job.record is not None:  # a hit: the answer is in hand
        hit = Final(JobState.succeeded, JobResult.model_validate_json(job.record[F.RESULT]), None)
        return _final_response(payload, created, hit, headers)

    async def final_answer() -> Response:
        return _final_response(payload, created, await _wait(ctx, payload, job.repeat))

    return WaitingResponse(final_answer, on_abandon)


def _final_response(payload: JobPayload, created: int, final: Final | None,
                    headers: dict[str, str] | None = None) -> Response:
    if final is None:
        return error_response(504, f"no worker serving model `{payload.model}` started this job within "
                                   f"{NO_WORKER_WAIT_S:g}s, so it was cancelled; try again later",
                              type_="no_worker", code="no_worker")
    if final.state != JobState.succeeded or final.result is None:
        err = final_error(final)
        return error_response(_FINAL_STATUS.get(final.state, 500), err["message"], type_=err["type"])
    return JSONResponse(responses.result_object(payload.kind, payload.id, payload.model, created, final.result,
                                                want_logprobs=payload.sampling.logprobs is not None,
                                                echo_chars=responses.echo_chars(payload)),
                        headers=headers)


async def _wait(ctx: GatewayContext, payload: JobPayload, repeat: bool) -> Final | None:
    """The job's Final; None when no worker was live at submission and none started it in time."""
    if repeat or await ctx.registry.serving(payload.model):
        return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)
    try:
        async with asyncio.timeout(NO_WORKER_WAIT_S):
            return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)
    except TimeoutError:
        if await ctx.store.cancel(JobRef.of(payload), only_queued=True) == JobState.queued.value:
            return None
    return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)  # it started meanwhile: its worker answers
