"""Reading jobs, the gateway's side of docs/redis-protocol.md: follow a job's output and wait for its end
(every write goes through jobstore)."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gateway.event_hub import Hub, Subscription, event_hub
from gateway.responses import logprob_entries
from jobstore import JobStore
from protocol import keys
from protocol.events import DeltaEvent, StateEvent, parse_event
from protocol.jobs import Choice, JobError, JobResult, JobState, TokenLogprob
from protocol.outage import REDIS_AWAY

RECHECK_S = 2.0  # a waiter re-reads the hash this often, in case a pub/sub message was missed
RECONNECT_FOR_S = 60.0  # a follower that lost Redis keeps trying this long before it gives up


async def read_job(store: JobStore, job_id: str) -> dict[str, str] | None:
    """The job's record (its text included), its deadline applied first when it has passed: through the
    gateway's store, whose `on_ended` counts a job that this read expired."""
    return await store.read_current(job_id)


@dataclass(frozen=True)
class Delta:
    text: str
    offset: int  # where `text` starts in its choice's whole output
    # The logprob entries published with exactly this text, in order after the ones before; None when
    # the text came from the hash (a snapshot or a missed delta), which keeps no logprobs, unless the job had
    # ended and the text is the whole of its choice's (then its result's entries: _whole_entries).
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice
    # Set on the choice's last delta when it ended before the job (protocol.events.DeltaEvent)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def end(self) -> int:
        return self.offset + len(self.text)


@dataclass(frozen=True)
class Final:
    state: JobState
    result: JobResult | None
    error: JobError | None


@dataclass(frozen=True)
class Restarted:
    """The job's output no longer begins with the text the reader was given: its worker stopped (a drain, a
    lapsed lease) and another attempt began from the start with other text. The reader's text is not the
    job's answer; following ends here. (An attempt that writes the same text again, as a greedy one does,
    is followed on without this.)"""

    index: int  # the first choice found to differ


Idle = None  # yielded when nothing happened for RECHECK_S (lets SSE writers send a keep-alive)


async def follow(redis: aioredis.Redis, job_id: str, offset: int | Sequence[int] = 0, want_deltas: bool = True,
                 mark: bool = True, hub: Hub | None = None, store: JobStore | None = None,
                 digests: Sequence[int | None] = ()) -> AsyncIterator[Delta | Final | Restarted | None]:
    """A job's output from character `offset` on (one per choice for a job of several), then its Final;
    no text lost or repeated, and none that is not the job's: Restarted when a new attempt's text differs
    from what was given (checked on the text given by this call, and for a resumed reader on the CRC-32 of
    its text before `offset` where `digests` has it, once the job's text reaches that far again).

    Joins the job's channel on `hub` (the gateway's one pub/sub connection; without one, a hub of its own
    for this call) first, then (if want_deltas and mark) sets `streamed`, then reads the hash snapshot:
    anything published after the snapshot reaches the subscription, and anything before it is in the
    snapshot. When the connection to Redis is lost it joins again and resumes from a fresh snapshot, for up
    to RECONNECT_FOR_S; then the error goes to the caller. `store` reads the snapshots (the gateway's, on
    its shared connection); without one, a store on `redis`."""
    own_hub = hub is None
    hub = hub or event_hub(redis)
    store = store or JobStore(redis)
    offsets = [offset] if isinstance(offset, int) else list(offset)
    cursor = _Cursor(offsets, digests=[*digests, *[None] * (len(offsets) - len(digests))])
    lost_at: float | None = None
    backoff = 0.05
    try:
        while True:
            try:
                async with hub.join(keys.events_channel(job_id)) as sub:
                    async for item in _follow_once(store, sub, job_id, cursor, want_deltas, mark):
                        lost_at, backoff = None, 0.05
                        yield item
                        if isinstance(item, Final | Restarted):
                            return
            except (*REDIS_AWAY, TimeoutError):
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
    # Per choice, the pieces of text given from `starts[index]` on (joined only to compare them: a new delta
    # begins where the given text ends, so only snapshots and restarts overlap it). A resumed reader's text
    # before its offset is unknown.
    given: list[list[str]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    # Per choice, the CRC-32 of the resumed reader's text before `starts[index]`, until the job's text is seen
    # to reach that far (then checked, and None).
    digests: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.starts:
            self.starts = list(self.offsets)
            self.given = [[] for _ in self.offsets]

    def at(self, index: int) -> int:
        return self.offsets[index] if index < len(self.offsets) else 0

    def copy(self) -> _Cursor:
        return _Cursor(list(self.offsets), self.snap_seq, [list(p) for p in self.given], list(self.starts),
                       list(self.digests))

    def unchecked(self, index: int) -> bool:
        """Whether the resumed reader's text before its offset is still to be checked for this choice."""
        return index < len(self.digests) and self.digests[index] is not None

    def advance(self, delta: Delta) -> None:
        grow = delta.index + 1 - len(self.offsets)
        self.offsets += [0] * grow
        self.starts += [0] * grow
        self.given += [[] for _ in range(grow)]
        self.offsets[delta.index] = delta.end
        self.given[delta.index].append(delta.text)

    def agrees(self, index: int, offset: int, text: str) -> bool:
        """Whether `text`, at `offset` of the choice's output, matches what the reader was given where the two
        overlap."""
        if index >= len(self.offsets):
            return True
        start = self.starts[index]
        if offset == 0 and self.unchecked(index) and len(text) >= start:
            if zlib.crc32(text[:start].encode()) != self.digests[index]:
                return False
            self.digests[index] = None
        lo, hi = max(offset, start), min(offset + len(text), self.offsets[index])
        if lo >= hi:
            return True
        given = "".join(self.given[index])
        self.given[index] = [given]
        return text[lo - offset:hi - offset] == given[lo - start:hi - start]


async def _follow_once(store: JobStore, sub: Subscription, job_id: str, cursor: _Cursor,
                       want_deltas: bool, mark: bool) -> AsyncIterator[Delta | Final | None]:
    if want_deltas and mark:
        await store.mark_streamed(job_id)
    while True:
        # Snapshot: on entry, and again after silence or a gap in the deltas.
        state, texts, seq, result, error = await store.snapshot(job_id)
        cursor.snap_seq = max(cursor.snap_seq, seq)
        job_state = None if state is None else JobState(state)
        final = (Final(job_state, _parse(JobResult, result), _parse(JobError, error))
                 if job_state is not None and job_state.final else None)
        ended = {c.index: c for c in final.result.all_choices()} if final and final.result and want_deltas else {}
        for index, text in enumerate(texts if want_deltas else ()):
            if not cursor.agrees(index, 0, text):
                yield Restarted(index)
                return
            if len(text) > cursor.at(index):
                delta = Delta(text[cursor.at(index):], cursor.at(index), index=index,
                              logprobs=_whole_entries(final, ended.get(index), cursor.at(index), text))
                cursor.advance(delta)
                yield delta
        if job_state is None:
            yield Final(JobState.expired, None, JobError(type="not_found", message="job record is gone"))
            return
        if final is not None:
            for tail in _tails(final, cursor) if want_deltas else ():
                if isinstance(tail, Restarted):
                    yield tail
                    return
                cursor.advance(tail)
                yield tail
            yield final
            return
        async for item in _events(sub, cursor.copy(), want_deltas):
            if isinstance(item, Delta):
                cursor.advance(item)
            yield item
            if isinstance(item, Final | Restarted):
                return
        # _events returned: silence or a gap; go round and re-read the snapshot.


async def _events(sub: Subscription, cursor: _Cursor, want_deltas: bool
                  ) -> AsyncIterator[Delta | Final | Restarted | None]:
    snap_seq = cursor.snap_seq
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
            if cursor.unchecked(event.index) and event.offset + len(event.text) >= cursor.starts[event.index]:
                return  # the job's text reaches the resumed reader's offset again: the hash has it whole
            if not cursor.agrees(event.index, event.offset, event.text):
                yield Restarted(event.index)
                return
            end = event.offset + len(event.text)
            if end > offset or (event.finish_reason is not None and end == offset):
                whole = offset == event.offset
                delta = Delta(event.text[offset - event.offset:], offset, event.logprobs if whole else None,
                              event.index, event.finish_reason, event.stop_reason)
                cursor.advance(delta)
                yield delta
        elif isinstance(event, StateEvent) and event.state.final:
            final = Final(event.state, event.result, event.error)
            for tail in _tails(final, cursor) if want_deltas else ():
                yield tail
                if isinstance(tail, Restarted):
                    return
            yield final
            return


def _tails(final: Final, cursor: _Cursor) -> list[Delta | Restarted]:
    """Text of the result that no delta carried (a job nobody streamed until late, or a lost message), or
    Restarted when the result does not begin with the text given (or is shorter: a new attempt that ended
    sooner)."""
    if final.result is None:
        return []
    choices = final.result.all_choices()
    for c in choices:
        if len(c.text) < cursor.at(c.index) or not cursor.agrees(c.index, 0, c.text):
            return [Restarted(c.index)]
    return [Delta(c.text[cursor.at(c.index):], cursor.at(c.index), index=c.index,
                  logprobs=_whole_entries(final, c, cursor.at(c.index), c.text))
            for c in choices if len(c.text) > cursor.at(c.index)]


def _whole_entries(final: Final | None, choice: Choice | None, offset: int, text: str) -> list[TokenLogprob] | None:
    """The logprob entries of a text that is the whole of an ended job's `choice` (from offset 0): its result's,
    so that a reader who comes after the end gets them with the text, as a live one does."""
    if final is None or final.result is None or choice is None or offset != 0 or choice.text != text:
        return None
    return logprob_entries(final.result, choice) or None


def _parse(model: type, raw: str | None):
    return model.model_validate_json(raw) if raw else None


async def wait_final(redis: aioredis.Redis, job_id: str, hub: Hub | None = None,
                     store: JobStore | None = None) -> Final:
    async for item in follow(redis, job_id, want_deltas=False, hub=hub, store=store):
        if isinstance(item, Final):
            return item
    raise RuntimeError("follow ended without a final state")
