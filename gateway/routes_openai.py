"""OpenAI-compatible routes: POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from gateway import responses
from gateway.admission import idempotency_key, idempotency_of, limits_of, prompts_too_many
from gateway.auth import Tenant
from gateway.context import Caller, GatewayContext, get_caller
from gateway.enqueue import Enqueued, enqueue, submit
from gateway.errors import ApiError, error_response, final_status
from gateway.jobs import Final, wait_final
from gateway.prepare import prepare
from gateway.prompt_list import cancel_all, joined_events, joined_result, prompt_key, split_prompts
from gateway.response_cache import ENTRY_HEADER, HEADER
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.sse import (
    STOPPING_EVENT,
    completion_chunks,
    completion_events,
    final_error,
    sse_response,
)
from gateway.waiting import WaitingResponse
from jobstore import JobRef
from protocol import job_record as F
from protocol.jobs import JobError, JobPayload, JobResult, JobState

router = APIRouter()
# A completion (a client holding its connection open) submitted while no worker of its model is live waits
# this long for one to start it; a job still queued then is cancelled and the client gets a 504 (a stream:
# an error event) saying why.
NO_WORKER_WAIT_S = 60.0
_watchdogs: set[asyncio.Task] = set()  # the streams' no-worker timers, held until they end


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, caller: Caller = Depends(get_caller),
                           key: str | None = Depends(idempotency_key)) -> Response:
    return await answer(caller.ctx, caller.tenant, body, key)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, caller: Caller = Depends(get_caller),
                      key: str | None = Depends(idempotency_key)) -> Response:
    return await answer(caller.ctx, caller.tenant, body, key)


async def answer(ctx: GatewayContext, tenant: Tenant, body: ChatCompletionRequest | CompletionRequest,
                 idempotency_key: str | None) -> Response:
    """Enqueue the job and answer: an SSE stream, or a response that sends the completion once the job is
    final. Either way a client that disconnects first cancels the job (unless `run_to_completion`). The
    FastAPI routes and gateway/fastpath.py both answer with this (the key already checked)."""
    if isinstance(body, CompletionRequest) and (bodies := split_prompts(body)) is not None:
        return await _answer_prompts(ctx, tenant, body, bodies, idempotency_key)
    job = await enqueue(ctx, tenant, body, body.priority, body.stream, {}, idempotency_key)
    payload, created = job.payload, int(job.created_at)
    headers = job.cache_headers or None
    on_abandon = _canceller(ctx, job, idempotency_key)
    if body.stream:
        await _watch_for_no_worker(ctx, job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(completion_events(ctx.redis, payload, created, include_usage, on_abandon,
                                              mark=job.repeat, hub=ctx.hub, store=ctx.store), headers,
                            on_stop=STOPPING_EVENT)
    if (hit := _hit(job)) is not None:  # the answer is in hand
        return _final_response(payload, created, hit, headers)

    async def final_answer() -> Response:
        return _final_response(payload, created, await _wait(ctx, payload, job.repeat))

    return WaitingResponse(final_answer, on_abandon)


async def _answer_prompts(ctx: GatewayContext, tenant: Tenant, body: CompletionRequest,
                          bodies: list[CompletionRequest], idempotency_key: str | None) -> Response:
    """A completion of several prompts (gateway/prompt_list.py): every prompt is checked before any job is
    queued, and a prompt refused by a limit cancels the jobs queued before it, so the request is queued
    whole or not at all."""
    decision = await ctx.cache.decide(tenant.name, body.cache)
    payloads = [await prepare(ctx.registry, b, body.priority, body.stream, tenant.name) for b in bodies]
    if (error := prompts_too_many(tenant, len(payloads), sum(p.cost_tokens for p in payloads))) is not None:
        raise error
    jobs: list[Enqueued] = []
    idempotency = idempotency_of(idempotency_key, body)  # the whole request's digest, on every prompt's key
    try:
        for i, (b, p) in enumerate(zip(bodies, payloads, strict=True)):
            keyed = None if idempotency is None else replace(idempotency, key=prompt_key(idempotency.key, i))
            jobs.append(await submit(ctx, tenant, b, p, decision, {}, keyed))
    except ApiError:
        await _withdraw(ctx, tenant, jobs, idempotency_key)
        raise
    n = payloads[0].sampling.n
    cancels = [_canceller(ctx, job, prompt_key(idempotency_key, i)) for i, job in enumerate(jobs)]
    completion_id = responses.completion_id("completion", jobs[0].payload.id)
    if body.stream:
        for job in jobs:
            await _watch_for_no_worker(ctx, job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streams = [completion_chunks(ctx.redis, job.payload, int(job.created_at), True, cancel,
                                     mark=job.repeat, hub=ctx.hub, store=ctx.store)
                   for job, cancel in zip(jobs, cancels, strict=True)]
        return sse_response(joined_events(streams, n, completion_id, include_usage), _cache_headers(jobs),
                            on_stop=STOPPING_EVENT)

    async def final_answer() -> Response:
        finals = await asyncio.gather(*(_final_of(ctx, job) for job in jobs))
        results = []
        for job, final in zip(jobs, finals, strict=True):
            answer = _final_body(job.payload, int(job.created_at), final)
            if isinstance(answer, Response):
                return answer
            results.append(answer)
        return JSONResponse(joined_result(results, n), headers=_cache_headers(jobs))

    return WaitingResponse(final_answer, cancel_all(cancels))


def _cache_headers(jobs: list[Enqueued]) -> dict[str, str] | None:
    """A completion of several prompts some of which a cache answered: each prompt's cache (`none` for one
    that ran) and entry (empty for none), comma-separated in prompt order."""
    if all(job.cache is None for job in jobs):
        return None
    return {HEADER: ",".join(job.cache or "none" for job in jobs),
            ENTRY_HEADER: ",".join(job.cache_entry or "" for job in jobs)}


async def _withdraw(ctx: GatewayContext, tenant: Tenant, jobs: list[Enqueued], idempotency_key: str | None) -> None:
    """Cancel the jobs queued for a request refused after all, free their keys and give back what they
    counted against the tenant's rpm and tpm (a refused request counts towards no limit), so that the
    client's retry is queued whole."""
    for i, job in enumerate(jobs):
        if not job.queued_here:
            continue
        await ctx.store.refund(job.payload, job.created_at, limits_of(tenant, 0), tokens=job.cache is None)
        await ctx.canceller.cancel(JobRef.of(job.payload))
        if (key := prompt_key(idempotency_key, i)) is not None:
            await ctx.store.release_idempotency_key(tenant.name, key, job.payload.model, job.payload.id)


def _canceller(ctx: GatewayContext, job: Enqueued, idempotency_key: str | None) -> Callable[[], None] | None:
    """What cancels the job when its client leaves, unless a repeat of its key waits on it too (the last
    client to leave cancels it): nothing for a cache hit or a repeat that found it final, or a job asked to
    run to completion. The cancel frees the request's Idempotency-Key, so that the client's retry (the key's
    very use: its connection dropped) runs the job again rather than getting the cancelled one."""
    if not (job.queued_here or job.attached) or job.payload.run_to_completion:
        return None
    ref = JobRef.of(job.payload)

    def cancel() -> None:
        ctx.canceller.cancel_detached(ref, idempotency_key)
    return cancel


def _hit(job: Enqueued) -> Final | None:
    """A response-cache hit's Final (its record holds the result); None for a job that runs."""
    if job.cache and job.record is not None:
        return Final(JobState.succeeded, JobResult.model_validate_json(job.record[F.RESULT]), None)
    return None


async def _final_of(ctx: GatewayContext, job: Enqueued) -> Final | None:
    return _hit(job) or await _wait(ctx, job.payload, job.repeat)


def _final_response(payload: JobPayload, created: int, final: Final | None,
                    headers: dict[str, str] | None = None) -> Response:
    answer = _final_body(payload, created, final)
    return answer if isinstance(answer, Response) else JSONResponse(answer, headers=headers)


def _final_body(payload: JobPayload, created: int, final: Final | None) -> dict[str, Any] | Response:
    """The completion of a job that succeeded; the error response of one that did not."""
    if final is None:
        return error_response(504, _no_worker(payload.model).message, type_="no_worker", code="no_worker")
    if final.state != JobState.succeeded or final.result is None:
        err = final_error(final)
        return error_response(final_status(final.state, err["type"]), err["message"], type_=err["type"],
                              code=err["code"])
    return responses.result_object(payload.kind, payload.id, payload.model, created, final.result,
                                   want_logprobs=payload.sampling.logprobs is not None,
                                   echo_chars=responses.echo_chars(payload))


async def _wait(ctx: GatewayContext, payload: JobPayload, repeat: bool) -> Final | None:
    """The job's Final; None when no worker was live at submission and none started it in time."""
    if repeat or await ctx.registry.serving(payload.model):
        return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)
    try:
        async with asyncio.timeout(NO_WORKER_WAIT_S):
            return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)
    except TimeoutError:
        if await _cancel_unstarted(ctx, payload):
            return None
    return await wait_final(ctx.redis, payload.id, ctx.hub, ctx.store)  # it started meanwhile: its worker answers


def _no_worker(model: str) -> JobError:
    return JobError(type="no_worker", message=f"no worker serving model `{model}` started this job within "
                                              f"{NO_WORKER_WAIT_S:g}s, so it was cancelled; try again later")


async def _cancel_unstarted(ctx: GatewayContext, payload: JobPayload) -> bool:
    """Cancel the job with a no_worker error if no worker has started it; True when this cancelled it."""
    state = await ctx.store.cancel(JobRef.of(payload), only_queued=True, error=_no_worker(payload.model))
    return state == JobState.queued.value


async def _watch_for_no_worker(ctx: GatewayContext, job: Enqueued) -> None:
    """A stream has no response to give up on: when no worker of its model is live, its job is cancelled
    with a no_worker error (which ends the stream with it) unless a worker starts it within NO_WORKER_WAIT_S."""
    if not job.queued_here or await ctx.registry.serving(job.payload.model):
        return

    async def watch() -> None:
        await asyncio.sleep(NO_WORKER_WAIT_S)
        await _cancel_unstarted(ctx, job.payload)

    task = asyncio.create_task(watch())
    _watchdogs.add(task)
    task.add_done_callback(_watchdogs.discard)
