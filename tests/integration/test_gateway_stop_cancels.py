"""At the gateway's stop, a waiting completion tells its client to retry and gives its job up: the job must be
cancelled before the process ends, or it runs for nobody while the client's retry runs too."""

from __future__ import annotations

import asyncio

from gateway.app import create_app
from jobstore import JobRef
from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobPayload, new_job_id
from protocol.sampling import SamplingParams
from tests.fakes import submit_job


async def test_a_job_given_up_as_the_gateway_stops_is_cancelled_before_its_redis_client_closes(
        redis_url, redis_client, monkeypatch):
    payload = JobPayload(id=new_job_id("m"), model="m", kind="completion", prompt_token_ids=[1, 2, 3],
                         sampling=SamplingParams(max_tokens=4))
    await submit_job(redis_client, payload)
    app = create_app(redis_url)
    async with app.router.lifespan_context(app):
        store = app.state.ctx.store
        cancel = store.cancel

        async def slow_cancel(ref: JobRef) -> str:  # a Redis a little slow at the moment of the stop
            await asyncio.sleep(0.3)
            return await cancel(ref)

        monkeypatch.setattr(store, "cancel", slow_cancel)
        app.state.ctx.canceller.cancel_detached(JobRef.of(payload))  # what WaitingResponse's on_abandon does
    assert await redis_client.hget(keys.job_key(payload.id), f.STATE) == "cancelled"
