"""Reading jobs, the gateway's side of docs/redis-protocol.md: follow a job's output and wait for its end
(every write goes through jobstore)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.event_hub import Hub, Subscription, event_hub
from jobstore import JobStore
from protocol import keys
from protocol.events import DeltaEvent, StateEvent, parse_event
from protocol.jobs import JobError, JobResult, JobState, TokenLogprob

RECHECK_S = 2.0  # a waiter re-reads the hash this often, in case a pub/sub message was missed
RECONNECT_FOR_S = 60.0  # a follower that lost Redis keeps trying this long before it gives up


async def read_job(redis: aioredis.Redis, job_id: str) -> dict[str, str] | None:
    """The job's record (its text included), its deadline applied first when it has passed."""
    return await JobStore(redis).read_current(job_id)


@dataclass(frozen=True)
class Delta:
    text: str
    offset: int  # where `text` starts in its choice's whole output
    # The logprob entries published with exactly this text, in order after the ones before; None when
    # the text came from the hash (a snapshot or a missed delta), which keeps no logprobs.
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice

    @property
    def end(self) -> int:
        return self.offset + len(self.text)


@dataclass(frozen=True)
class Final:
    state: JobState
    result: JobResult | None
    error: JobError | None


Idle = None  # yielded when nothing happened for RECHECK_S (lets SSE writers send a keep-alive)


async def follow(redis: aioredis.Redis, job_id: str, offset: int | Sequence[int] = 0, want_deltas: bool = True,
                 mark: bool = True, hub: Hub | None = None, store: JobStore | None = None
                 ) -> AsyncIterator[Delta | Final | None]:
    """A job's output from character `offset` on (one per choice for a job of several), then its Final;
    no text lost or repeated.

    Joins the job's channel on `hub` (the gateway's one pub/sub connection; without one, a hub of its own
    for this call) first, then (if want_deltas and mark) sets `streamed`, then reads the hash snapshot:
    anything published after the snapshot reaches the subscription, and anything before it is in the
    snapshot. When the connection to Redis is lost it joins again and resumes from a fresh snapshot, for up
    to RECONNECT_FOR_S; then the error goes to the caller. `store` reads the snapshots (the gateway's, on
    its shared connection); without one, a store on `redis`."""
    own_hub = hub is None
    hub = hub or event_hub(redis)
    store = store or JobStore(redis)
    cursor = _Cursor([offset] if isinstance(offset, int) else list(offset))
    lost_at: float | None = None
    backoff = 0.05
    try:
        while True:
            try:
                async with hub.join(keys.events_channel(job_id)) as sub:
                    async for item in _follow_once(store, sub, job_id, cursor, want_deltas, mark):
                        lost_at, backoff = None, 0.05
                        yield item
                        if isinstance(item, Final):
                            return
            except (RedisConnectionError, RedisTimeoutError, TimeoutError):
                now = time.monotonic()
                lost_at = lost_at or now
                if now - lost_at > RECONNECT_FOR_S:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
    finally:
        if own_hub:
            await hub.aclose()


@dataclass
class _Cursor:
    offsets: list[int] = field(default_factory=list)  # per choice: characters already given to the reader
    snap_seq: int = -1  # events up to this sequence number are in a snapshot already read

    def at(self, index: int) -> int:
        return self.offsets[index] if index < len(self.offsets) else 0

    def advance(self, delta: Delta) -> None:
        self.offsets += [0] * (delta.index + 1 - len(self.offsets))
        self.offsets[delta.index] = delta.end


async def _follow_once(store: JobStore, sub: Subscription, job_id: str, cursor: _Cursor,
                       want_deltas: bool, mark: bool) -> AsyncIterator[Delta | Final | None]:
    if want_deltas and mark:
        await store.mark_streamed(job_id)
    while True:
        # Snapshot: on entry, and again after silence or a gap in the deltas.
        state, texts, seq, result, error = await store.snapshot(job_id)
        cursor.snap_seq = max(cursor.snap_seq, seq)
        for index, text in enumerate(texts if want_deltas else ()):
            if len(text) > cursor.at(index):
                delta = Delta(text[cursor.at(index):], cursor.at(index), index=index)
                cursor.advance(delta)
                yield delta
        if state is None:
            yield Final(JobState.expired, None, JobError(type="not_found", message="job record is gone"))
            return
        job_state = JobState(state)
        if job_state.final:
            final = Final(job_state, _parse(JobResult, result), _parse(JobError, error))
            for tail in _tails(final, cursor) if want_deltas else ():
                cursor.advance(tail)
                yield tail
            yield final
            return
        async for item in _events(sub, cursor.snap_seq, list(cursor.offsets), want_deltas):
            if isinstance(item, Delta):
                cursor.advance(item)
            yield item
            if isinstance(item, Final):
                return
        # _events returned: silence or a gap; go round and re-read the snapshot.


async def _events(sub: Subscription, snap_seq: int, offsets: list[int],
                  want_deltas: bool) -> AsyncIterator[Delta | Final | None]:
    cursor = _Cursor(offsets)
    while True:
        data = await sub.get(timeout=RECHECK_S)
        if data is None:
            yield Idle
            return
        event = parse_event(data)
        if event.seq <= snap_seq:
            continue  # already in the snapshot
        if isinstance(event, DeltaEvent):
            if not want_deltas:
                continue
            offset = cursor.at(event.index)
            if event.offset > offset:
                return  # we missed a delta: the hash has it
            end = event.offset + len(event.text)
            if end > offset:
                whole = offset == event.offset
                delta = Delta(event.text[offset - event.offset:], offset, event.logprobs if whole else None,
                              event.index)
                cursor.advance(delta)
                yield delta
        elif isinstance(event, StateEvent) and event.state.final:
            final = Final(event.state, event.result, event.error)
            for tail in _tails(final, cursor) if want_deltas else ():
                yield tail
            yield final
            return


def _tails(final: Final, cursor: _Cursor) -> list[Delta]:
    """Text of the result that no delta carried (a job nobody streamed until late, or a lost message)."""
    if final.result is None:
        return []
    return [Delta(c.text[cursor.at(c.index):], cursor.at(c.index), index=c.index)
            for c in final.result.all_choices() if len(c.text) > cursor.at(c.index)]


def _parse(model: type, raw: str | None):
    return model.model_validate_json(raw) if raw else None


async def wait_final(redis: aioredis.Redis, job_id: str, hub: Hub | None = None,
                     store: JobStore | None = None) -> Final:
    async for item in follow(redis, job_id, want_deltas=False, hub=hub, store=store):
        if isinstance(item, Final):
            return item
    raise RuntimeError("follow ended without a final state")
