"""Pulls jobs from the model's tenant streams into the engine, never more than the engine can admit.

Each (model, lane) has one stream per tenant, so a tenant's backlog cannot starve the others. Lanes are
read highest first, each up to the engine's room for its priority: a better lane's room counts the worse
work it may preempt. Within a lane, tenants round-robin: non-blocking `XREADGROUP`s over the tenant
streams (starting after the tenant served last, an equal share of the room each), repeated while room is
left and some stream still gave an entry. When nothing came, intake blocks in `XREADGROUP` on every
tenant stream: the group hands each entry to one blocked worker, with the wake-up.

While the worst lane has no room (batch lines fill every slot) a second loop blocks on the better lanes'
streams alone, so an interactive job is pulled the moment it is queued; the main loop meanwhile waits for
the engine's room, not on Redis, so a slot that frees is refilled at once.

Tenants are discovered from the lanes' tenant sets: their sizes are checked every round (sets only grow),
the members re-read every second; the blocking reads also watch the model's new-tenants stream, whose
entry (a tenant's first job on a lane) ends the block so that the new stream is read at once. Entries of
dead workers, and those a draining worker handed back, come in through `Recovery` when a sweep is due, lane
by lane in the same order and room as new entries (each lane's before its new ones): a handed-back batch
line never goes ahead of an interactive job. Whatever the engine cannot admit stays in Redis, visible to
other workers and to autoscalers.

Each loop's blocking reads go out on a connection of its own (a blocked connection holds every command
behind it) through jobstore/pipe.py rather than redis-py: the entry that ends the block is an idle worker's
time to first token, and redis-py's command path and reply parsing were a measurable part of it
(docs/BENCHMARKS.md). A loop cancelled while blocked closes its connection, so that Redis hands no entry to
a read nobody waits for.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from jobstore import JobRef, Started
from jobstore.connect import is_cluster
from jobstore.pipe import RedisPipe
from protocol import keys
from protocol.errors import CONTEXT_LENGTH_EXCEEDED, no_room_message
from protocol.jobs import JobError, JobPayload, JobState
from protocol.outage import REDIS_DOWN, Outage
from tokenq.logs import get_logger
from worker import metrics
from worker.engine_loop import EngineHandle
from worker.pruning import Pruner
from worker.publisher import Publisher, RunningJob
from worker.recovery import Recovery

log = get_logger("intake")

BLOCK_MS = 500
REFRESH_S = 1.0
RETRIES = 5
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Entry:
    lane: str
    stream: str
    entry_id: str
    fields: dict[str, str]


class TenantStreams:
    """The tenant streams of one model, per lane (sorted), each with the consumer group made sure of."""

    def __init__(self, redis: Redis, model: str, refresh_s: float = REFRESH_S) -> None:
        self.redis = redis
        self.model = model
        self.refresh_s = refresh_s
        self.by_lane: dict[str, list[str]] = {lane: [] for lane in keys.LANES}
        self.lane_of: dict[str, str] = {}
        self._sizes: list[int] = []
        self._grouped: set[str] = set()
        self._refreshed = float("-inf")
        self.new_tenants = keys.new_tenants_stream(model)

    def all(self) -> list[str]:
        return [s for lane in keys.LANES for s in self.by_lane[lane]]

    def seconds_to_refresh(self) -> float:
        return max(0.0, self._refreshed + self.refresh_s - time.monotonic())

    def reset(self) -> None:
        """Forget which groups exist (a stream was deleted under us): the next refresh re-creates them."""
        self._grouped.clear()
        self._refreshed = float("-inf")

    async def refresh(self) -> None:
        """Re-read the tenant sets if a second has passed or one of them grew."""
        sets = [keys.lane_tenants_key(self.model, lane) for lane in keys.LANES]
        if self.seconds_to_refresh() > 0:
            pipe = self.redis.pipeline(transaction=False)
            for key in sets:
                pipe.scard(key)
            if await pipe.execute() == self._sizes:
                return
        pipe = self.redis.pipeline(transaction=False)
        for key in sets:
            pipe.smembers(key)
        members = await pipe.execute()
        self._sizes = [len(m) for m in members]
        for lane, tenants in zip(keys.LANES, members, strict=True):
            self.by_lane[lane] = sorted(keys.jobs_stream(self.model, lane, t) for t in tenants)
            self.lane_of.update((s, lane) for s in self.by_lane[lane])
        await self._ensure_groups([s for s in [*self.all(), self.new_tenants] if s not in self._grouped])
        self._refreshed = time.monotonic()

    def changed(self) -> None:
        """A tenant has a new stream: the next refresh re-reads the sets."""
        self._refreshed = float("-inf")

    async def _ensure_groups(self, streams: list[str]) -> None:
        if not streams:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        for stream, res in zip(streams, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
                raise res
            self._grouped.add(stream)


class Intake:
    def __init__(self, redis: Redis, engine_loop: EngineHandle, publisher: Publisher, model: str,
                 consumer: str, max_model_len: int, block_ms: int = BLOCK_MS,
                 recovery: Recovery | None = None, pruner: Pruner | None = None) -> None:
        self.redis = redis
        self.store = publisher.store  # its start scripts share the publisher's connection for scripts
        self.engine_loop = engine_loop
        self.publisher = publisher
        self.model = model
        self.consumer = consumer
        self.max_model_len = max_model_len
        self.block_ms = block_ms
        self.recovery = recovery
        self.pruner = pruner
        self.streams = TenantStreams(redis, model)
        self._last: dict[str, str] = {}  # lane -> the tenant stream served last (round-robin cursor)
        # The blocking reads' connections, one per loop (none on a cluster: redis-py routes its reads).
        self._blocking: dict[str, RedisPipe] = {} if is_cluster(redis) else {
            name: RedisPipe(redis, RETRIES, CONNECT_TIMEOUT_S) for name in ("intake", "intake-better-lanes")}
        self.stopped = False  # set before cancelling the task: a second way out of the loop

    async def ensure_groups(self) -> None:
        await self.streams.refresh()

    async def aclose(self) -> None:
        for conn in self._blocking.values():
            await conn.aclose()

    async def run(self) -> None:
        """Pull until cancelled; Redis trouble is logged (once per outage) and retried with back-off, never
        fatal."""
        await asyncio.gather(self._serve("intake", self.poll), self._serve("intake-better-lanes", self.listen))

    async def _serve(self, name: str, poll) -> None:
        outage = Outage(log, name, cap_s=2.0)
        while not self.stopped:
            try:
                await poll()
                outage.restored()
            except REDIS_DOWN as e:  # before ResponseError: a cluster's node down is one
                await asyncio.sleep(outage.lost(e))
            except ResponseError as e:
                # A stream deleted under us (pruned, or by hand), while we read or blocked on it.
                if any(m in str(e) for m in ("NOGROUP", "no such key", "no longer exists")):
                    self.streams.reset()
                    continue
                log.error("intake failed", error=repr(e))
                await asyncio.sleep(1.0)

    async def poll(self) -> int:
        """One round: lanes in order, each lane's reclaimed entries (when a sweep is due) before its new ones,
        tenants round-robin, up to what the engine admits; wait when there is nothing. Room for better lanes
        alone is `listen`'s."""
        if self._room(keys.LANES[-1]) <= 0:
            await self._wait_for_capacity(lambda: self._room(keys.LANES[-1]) > 0)
            return 0
        await self.streams.refresh()
        await self._prune_when_due()
        sweep = self._sweep_due()
        read = 0
        for lane in keys.LANES:
            if sweep:
                read += await self._reclaim(lane)
            if (lane_room := self._room(lane)) > 0:
                read += await self._read_lane(lane, lane_room)
        if read == 0 and (room := self._room(keys.LANES[-1])) > 0:
            read = await self._wait_for_entries(room)
        return read

    async def listen(self) -> int:
        """While the worst lane has no room and a better one has (batch lines fill the engine), block on the
        better lanes' streams and admit what comes; otherwise wait for the engine's next report. The sweep
        is this loop's while it runs: a better lane's reclaimed entries use its room as its new ones do."""
        def mine() -> bool:
            return self._room(keys.LANES[-1]) <= 0 < self._room(keys.LANES[0])

        if not mine():
            await self._wait_for_capacity(mine)
            return 0
        await self.streams.refresh()
        if self._sweep_due():
            reclaimed = [await self._reclaim(lane) for lane in keys.LANES]
            if any(reclaimed):
                return sum(reclaimed)
        better = keys.LANES[:-1]
        streams = [s for lane in better if self._room(lane) > 0 for s in self.streams.by_lane[lane]]
        share = max(1, self._room(better[0]) // max(1, len(streams)))  # none: wait for a new tenant
        entries = await self._block_on(streams, share, "intake-better-lanes")
        if entries:
            await self._admit(entries)
        return len(entries)

    def _sweep_due(self) -> bool:
        """Whether this round reclaims idle entries: every lane's at once, each before its new entries."""
        return self.recovery is not None and self.recovery.start_sweep()

    async def _reclaim(self, lane: str) -> int:
        """One lane's entries idle past the lease (handed back or a dead worker's), up to the lane's room:
        they go before the lane's new entries, which were queued after them, and after a better lane's."""
        assert self.recovery is not None
        claimed = await self.recovery.claim(lane, self._tenant_order(lane), self._room(lane))
        await self._admit([Entry(lane, c.stream, c.entry_id, c.fields) for c in claimed], early=False)
        return len(claimed)

    async def _prune_when_due(self) -> None:
        if self.pruner is None or not self.pruner.due():
            return
        removed, _ = await self.pruner.prune()
        if removed:
            self.streams.reset()
            await self.streams.refresh()

    async def _block_on(self, streams: list[str], count: int, loop: str) -> list[Entry]:
        """A blocking XREADGROUP on `streams` and the new-tenants stream, on `loop`'s connection; the entries
        of `streams` (a new tenant's is acknowledged and makes the next refresh re-read the tenant sets)."""
        new = self.streams.new_tenants
        names = [*streams, new]
        conn = self._blocking.get(loop)
        if conn is None:
            resp = await self.redis.xreadgroup(keys.GROUP, self.consumer, {s: ">" for s in names}, count=count,
                                               block=self._wait_ms())
        else:
            try:
                resp = await conn.execute("XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", count,
                                          "BLOCK", self._wait_ms(), "STREAMS", *names, *(">" for _ in names))
            except asyncio.CancelledError:
                await conn.aclose()
                raise
        entries = self._entries([(stream, batch) for stream, batch in resp or [] if stream != new])
        woken = [eid for stream, batch in resp or [] if stream == new for eid, _ in batch]
        if woken:
            self.streams.changed()
            await self.redis.xack(new, keys.GROUP, *woken)
        return entries

    def _room(self, lane: str) -> int:
        return self.engine_loop.num_admissible(keys.LANE_PRIORITY[lane])

    async def _read_lane(self, lane: str, room: int) -> int:
        """Up to `room` entries of one lane, one per tenant per round, starting after the last served; the
        tenants this worker runs fewest jobs of go first, so a free slot goes to the least-served tenant
        rather than to whoever is next in turn (a tenant with a backlog fills the slots it gets back)."""
        order = self._tenant_order(lane)
        read = 0
        while order and read < room:
            gave: set[str] = set()
            i = 0
            while i < len(order) and read < room:
                chunk = order[i:i + room - read]
                i += len(chunk)
                # An equal share of the room for each tenant in the round: one entry each when the room is
                # tight, a whole batch in one round trip when one tenant has the lane to itself.
                share = max(1, (room - read) // len(chunk))
                resp = await self.redis.xreadgroup(keys.GROUP, self.consumer, {s: ">" for s in chunk},
                                                   count=share)
                entries = self._entries(resp)
                if entries:
                    gave.update(e.stream for e in entries)
                    self._last[lane] = entries[-1].stream
                    read += len(entries)
                    await self._admit(entries)
            order = [s for s in order if s in gave]  # the next round: only tenants that still had some
        return read

    def _tenant_order(self, lane: str) -> list[str]:
        """The lane's tenant streams in the order they are served (see `_read_lane`)."""
        streams = self.streams.by_lane[lane]
        start = bisect.bisect_right(streams, self._last.get(lane, ""))
        order = streams[start:] + streams[:start]
        running = Counter(job.payload.tenant for job in self.publisher.jobs.values())
        prefix = len(keys.jobs_stream(self.model, lane, ""))
        order.sort(key=lambda stream: running[stream[prefix:]])  # stable: round-robin among equals
        return order

    async def _wait_for_capacity(self, ready: Callable[[], bool]) -> None:
        """Until the engine reports again (every step while it runs; block_ms at most), unless `ready()` now."""
        event = self.engine_loop.capacity_changed
        assert event is not None
        event.clear()
        if ready():
            return
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(self.block_ms / 1000):
                await event.wait()
        except TimeoutError:
            pass

    def _wait_ms(self) -> int:
        """Block no longer than the next tenant refresh or recovery sweep."""
        wait = min(self.block_ms / 1000, self.streams.seconds_to_refresh())
        if self.recovery is not None:
            wait = min(wait, self.recovery.seconds_to_sweep())
        return max(1, int(wait * 1000))

    async def _wait_for_entries(self, room: int) -> int:
        """Block in XREADGROUP on every tenant stream until an entry arrives, and admit what it brings. The
        group hands each entry to one blocked worker (not a wake-up of all of them and a race), and the
        entry comes with the wake-up rather than one more round trip later: this is the idle worker's time
        to first token. Lanes need no order here: they were all empty when the read began."""
        streams = self.streams.all()  # none yet: the new-tenants stream alone brings the first
        entries = await self._block_on(streams, max(1, room // max(1, len(streams))), "intake")
        if entries:
            await self._admit(entries)
        return len(entries)

    def _entries(self, resp) -> list[Entry]:
        """The entries of an XREADGROUP reply, each with its stream's lane."""
        lane_of = self.streams.lane_of
        return [Entry(lane_of.get(stream, "default"), stream, eid, entry_fields(fields))
                for stream, batch in resp or [] for eid, fields in batch]

    async def _admit(self, entries: list[Entry], early: bool = True) -> None:
        valid: list[tuple[Entry, JobPayload]] = []
        for e in entries:
            payload = await self._parse(e.stream, e.entry_id, e.fields)
            if payload is None:
                continue
            if self.publisher.has(payload.id):
                continue  # our own entry, reclaimed after a stall or an outage: it runs here already
            valid.append((e, payload))
        if not valid:
            return
        # A new entry goes to the engine before its start script answers, so the prefill overlaps that
        # round trip (it is on every job's time to first token). The publisher holds the job's outputs
        # until the answer; a job the script refuses is aborted again. (A cancelled job's entry is deleted
        # with it, so refusals are rare here; reclaimed entries, often of finished jobs, wait instead.)
        now = time.time()
        if early:
            for e, payload in valid:
                self._run(e, payload)
        try:
            results = await self._start_all([p for _, p in valid], now)
        except BaseException:  # the entries stay pending in the group: recovery hands them out again
            if early:
                for _, payload in valid:
                    self._withdraw(payload)
            raise
        drop: list[tuple[str, str]] = []
        for (e, payload), res in zip(valid, results, strict=True):
            if res.code == 2:  # cancelled while the worker that ran it died: not run again
                if early:
                    self._withdraw(payload)
                await self.store.end_cancelled(JobRef.of(payload), e.stream, e.entry_id)
                log.info("job cancelled before its worker died; ended with its text so far", job_id=payload.id)
                continue
            if res.code != 1:
                log.info("job already final or gone; dropping entry", job_id=payload.id,
                         reason="final" if res.code == 0 else "no job record")
                if early:
                    self._withdraw(payload)
                drop.append((e.stream, e.entry_id))
                continue
            job = RunningJob(payload=payload, stream=e.stream, entry_id=e.entry_id,
                             streamed=payload.stream or res.streamed, seq=res.seq, started_at=now)
            if not early:
                self._run(e, payload)
            self.publisher.track(job)
            metrics.REQUESTS_STARTED.labels(self.model, e.lane).inc()
            metrics.QUEUE_TIME.labels(self.model, e.lane, payload.tenant).observe(max(0.0, now - payload.enqueued_at))
            log.debug("job started", job_id=payload.id, lane=e.lane, streamed=job.streamed)
        if drop:
            await self.store.ack(drop)

    def _run(self, e: Entry, payload: JobPayload) -> None:
        self.publisher.expect(payload.id)
        self.engine_loop.add(payload.id, payload.prompt_token_ids, payload.sampling,
                             priority=keys.LANE_PRIORITY[e.lane], tenant=payload.tenant)

    def _withdraw(self, payload: JobPayload) -> None:
        """Undo `_run` for a job whose start did not go through."""
        self.publisher.unexpect(payload.id)
        self.engine_loop.abort(payload.id)

    async def _start_all(self, payloads: list[JobPayload], now: float) -> list[Started]:
        return await self.store.start([p.id for p in payloads], now, self.consumer)

    async def _parse(self, stream: str, entry_id: str, fields: dict) -> JobPayload | None:
        """The entry's payload, or None after failing (or just dropping) an entry that cannot run."""
        job_id = fields.get("job_id")
        error: JobError | None = None
        payload: JobPayload | None = None
        try:
            payload = JobPayload.model_validate_json(fields.get("payload") or "")
        except ValidationError as e:
            error = _unrunnable(f"malformed job payload: {e.errors(include_url=False)[:3]}")
        if payload is not None:
            job_id = job_id or payload.id
            error = self._refuse(payload, job_id)
        if error is None and payload is not None:
            if payload.deadline is not None and time.time() >= payload.deadline:
                log.info("job expired in the queue", job_id=payload.id)
                await self.publisher.end_untracked(
                    payload.id, stream, entry_id, state=JobState.expired.value, tenant=payload.tenant,
                    lane=payload.lane, error=JobError(type="deadline_exceeded", message="the job expired before it started"))
                return None
            return payload

        assert error is not None
        metrics.MALFORMED_ENTRIES.labels(self.model).inc()
        log.warning("bad stream entry", job_id=job_id, entry_id=entry_id, stream=stream, problem=error.message)
        if job_id and await self.redis.exists(keys.job_key(job_id)):
            await self.publisher.end_untracked(job_id, stream, entry_id, error)
        else:
            await self.store.ack([(stream, entry_id)])
        return None

    def _refuse(self, payload: JobPayload, job_id: str) -> JobError | None:
        if payload.id != job_id:
            return _unrunnable(f"entry job_id {job_id!r} does not match payload id {payload.id!r}")
        if payload.model != self.model:
            return _unrunnable(f"job is for model {payload.model!r}, this worker serves {self.model!r}")
        if not payload.prompt_token_ids:
            return _unrunnable("empty prompt")
        # The gateway checked prompt + max_tokens against the card it had; a job queued before this worker
        # came with a shorter context (or checked against a card the gateway had not yet seen replaced) can
        # still be too long: the request's fault, answered as the gateway answers it. Only what the engine
        # cannot run at all: a longer max_tokens just ends with "length" at the context's end.
        if len(payload.prompt_token_ids) >= self.max_model_len:
            return JobError(type="invalid_request_error", code=CONTEXT_LENGTH_EXCEEDED,
                            message=no_room_message(self.max_model_len, len(payload.prompt_token_ids)))
        return None


def _unrunnable(problem: str) -> JobError:
    """An entry no worker can run, through no fault of the request's (a producer's bug): a 500."""
    return JobError(type="invalid_request", message=problem)


def entry_fields(fields: dict[str, str] | list[str] | None) -> dict[str, str]:
    """A stream entry's fields: redis-py's reply has them as a dict, the raw one (jobstore/pipe.py) as a flat
    list of names and values; None for an entry deleted while it was pending."""
    if not fields:
        return {}
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))
