"""One batch line as a job in the batch lane, through the gateway's own submission steps (prepare, then
jobstore's submit with the tenant's limits), so a line obeys every rule an interactive request does."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from batches import metrics
from batches.lines import BatchLine
from gateway.admission import limit_error, limits_of, max_queue_depth_from_env, too_large
from gateway.auth import Authenticator, Tenant
from gateway.errors import ApiError
from gateway.prepare import prepare
from gateway.registry import Registry
from gateway.schemas import dump_request
from jobstore import JobStore, Refused
from protocol import keys

# Answers that say "not now" rather than "never": the line is offered again later.
RETRY_STATUSES = frozenset({429, 503})


def line_job_id(batch_id: str, line: int, model: str) -> str:
    """The job of a line has a fixed id: submitting it twice (a feeder restarted) adds it once. It carries
    the shard of the line's model, as every job id does."""
    return keys.new_job_id(model, f"{batch_id.removeprefix('batch_')}_{line}")


def line_model(item: object) -> str:
    """The model a parsed line names ('' for a line that did not parse: it never becomes a job)."""
    return item.request().model if isinstance(item, BatchLine) else ""


@dataclass
class SubmitContext:
    """What submitting lines needs, built once per feeder process."""

    redis: aioredis.Redis
    registry: Registry
    store: JobStore
    auth: Authenticator
    max_queue_depth: int

    @classmethod
    def build(cls, redis: aioredis.Redis) -> SubmitContext:
        store = JobStore(redis, on_ended=metrics.job_ended)
        return cls(redis, Registry(redis), store, Authenticator(redis), max_queue_depth_from_env())


class RetryLater(Exception):
    """Admission or the model said 'not now' (a tenant limit, no worker yet)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def submit_line(ctx: SubmitContext, tenant: Tenant, batch_id: str, index: int, line: BatchLine,
                      deadline: float) -> str:
    """Queue the line's job; its id. ApiError for a request that can never run, RetryLater for one that
    cannot run yet."""
    body = line.request()
    job_id = line_job_id(batch_id, index, line_model(line))
    try:
        payload = await prepare(ctx.registry, body, "batch", False, tenant.name)
        given = payload.deadline
        payload = payload.model_copy(update={"id": job_id,
                                             "deadline": deadline if given is None else min(given, deadline)})
        metadata = {"batch_id": batch_id, "custom_id": line.custom_id}
        if (error := too_large(tenant, payload.cost_tokens)) is not None:
            raise error
        try:
            await ctx.store.submit(payload, dump_request(body), metadata, streamed=False,
                                   limits=limits_of(tenant, ctx.max_queue_depth))
        except Refused as refused:
            raise limit_error(tenant, refused, payload.cost_tokens, payload.model, payload.lane,
                              ctx.max_queue_depth) from None
    except ApiError as e:
        if e.status in RETRY_STATUSES:
            raise RetryLater(e) from e
        raise
    return job_id
