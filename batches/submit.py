"""One batch line as a job in the batch lane, through the gateway's own submission steps (prepare, the
tenant's admission, submit), so a line obeys every rule an interactive request does."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from batches.lines import BatchLine
from gateway.admission import Admission
from gateway.auth import Authenticator, Tenant
from gateway.cancel import Canceller
from gateway.errors import ApiError
from gateway.jobs import submit
from gateway.prepare import prepare
from gateway.registry import Registry
from gateway.schemas import dump_request

# Answers that say "not now" rather than "never": the line is offered again later.
RETRY_STATUSES = frozenset({429, 503})


def line_job_id(batch_id: str, line: int) -> str:
    """The job of a line has a fixed id: submitting it twice (a feeder restarted) adds it once."""
    return f"job_{batch_id.removeprefix('batch_')}_{line}"


@dataclass
class SubmitContext:
    """What submitting lines needs, built once per feeder process."""

    redis: aioredis.Redis
    registry: Registry
    admission: Admission
    auth: Authenticator
    canceller: Canceller

    @classmethod
    def build(cls, redis: aioredis.Redis) -> SubmitContext:
        return cls(redis, Registry(redis), Admission(redis), Authenticator(redis), Canceller(redis))


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
    job_id = line_job_id(batch_id, index)
    try:
        payload = await prepare(ctx.registry, body, "batch", False, tenant.name)
        given = payload.deadline
        payload = payload.model_copy(update={"id": job_id,
                                             "deadline": deadline if given is None else min(given, deadline)})
        tokens = len(payload.prompt_token_ids) + payload.sampling.max_tokens
        await ctx.admission.admit(tenant, job_id, tokens, None)
    except ApiError as e:
        if e.status in RETRY_STATUSES:
            raise RetryLater(e) from e
        raise
    metadata = {"batch_id": batch_id, "custom_id": line.custom_id}
    await submit(ctx.redis, payload, dump_request(body), metadata, streamed=False)
    return job_id
