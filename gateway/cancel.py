"""Cancelling a job from the gateway (the rule itself is jobstore's CANCEL script: a queued job ends
`cancelled` at once, a running one is stopped by its worker, a final one is left as it is)."""

from __future__ import annotations

import asyncio

from jobstore import JobRef, JobStore
from tokenq.logs import get_logger

log = get_logger(__name__)


class Canceller:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._detached: set[asyncio.Task] = set()

    async def cancel(self, ref: JobRef) -> str:
        """Cancel a job; returns the state it was in before ('' when it is gone)."""
        return await self.store.cancel(ref)

    def cancel_detached(self, ref: JobRef, idempotency_key: str | None = None) -> None:
        """Cancel from a place that is itself being cancelled (a response whose client left), unless another
        client (a repeat of its Idempotency-Key) still waits on the job; a job still queued or running also
        frees the key bound to it, before it is cancelled (jobstore's LEAVE)."""
        task = asyncio.get_running_loop().create_task(self._cancel_logged(ref, idempotency_key))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def settle(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the detached cancels still under way: at the gateway's stop, a waiting
        completion told its client to retry gives its job up this way, and the process must not end (nor its
        Redis client close) before the job is cancelled, or the job runs for nobody while its retry runs too."""
        if self._detached:
            await asyncio.wait(list(self._detached), timeout=timeout)

    async def _cancel_logged(self, ref: JobRef, idempotency_key: str | None) -> None:
        try:
            if not await self.store.leave(ref, idempotency_key):
                log.info("client disconnected; the job is final or another client waits on it", job_id=ref.id)
                return
            was = await self.cancel(ref)
            log.info("client disconnected; job cancelled", job_id=ref.id, was=was)
        except Exception as e:  # Redis down: the job runs on; nothing else to do here
            log.warning("could not cancel the job of a disconnected client", job_id=ref.id, error=repr(e))
