"""The worker's handle on an engine: add and abort requests, batches of outputs, snapshots of capacity.

`EngineHandle` is what intake, the publisher and the heartbeat see. Two kinds drive an engine:
`engine_process.EngineProcess` runs it in its own process (the served path: the worker process keeps
to Redis I/O and never shares an interpreter lock with the engine), and `EngineLoop` here runs an engine
object in a thread (test doubles and engines built in the same process).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import dataclass

from protocol import keys
from protocol.sampling import SamplingParams
from tokenq.logs import get_logger
from worker.engine.outputs import FailedOutput, RequestOutput

log = get_logger("engine_loop")

IDLE_STATS = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prefix_hit_rate": 0.0}
STEP_ERRORS_STAT = "step_errors"  # the driver's steps that raised (their requests failed), a lifetime total
PRIORITIES = tuple(sorted(keys.LANE_PRIORITY.values()))  # best first
WORST = PRIORITIES[-1]
Admissible = tuple[int, ...]  # what the engine admits of each priority, indexed by priority


def admissible_of(engine) -> Admissible:
    """The engine's room for each priority: a better priority has at least the room of a worse one (it
    may preempt them), so intake keeps pulling interactive jobs while batch work fills the engine."""
    return tuple(engine.num_admissible(p) for p in PRIORITIES)


class EngineHandle:
    """The asyncio side: what intake may still pull, the engine's last stats, and its output batches."""

    def __init__(self, name: str = "engine") -> None:
        self.name = name
        self.outputs: asyncio.Queue[list[RequestOutput]] | None = None
        self.capacity_changed: asyncio.Event | None = None  # set after every batch (intake waits on it)
        self.dead: asyncio.Event | None = None  # set when the engine stops for good on an error
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sequences of the adds sent (n per request), not yet counted by the engine's last num_admissible().
        self._pending_adds = 0
        self._admissible: Admissible = (0,) * len(PRIORITIES)
        self._stats: dict = dict(IDLE_STATS)

    def _open(self, admissible: Admissible) -> None:
        self._loop = asyncio.get_running_loop()
        self.outputs = asyncio.Queue()
        self.capacity_changed = asyncio.Event()
        self.dead = asyncio.Event()
        self._admissible = admissible

    def _received(self, outputs: list[RequestOutput], admissible: Admissible, adds_applied: int,
                  stats: dict | None) -> None:
        """On the asyncio loop: one report of the engine (a step's outputs and its snapshot)."""
        assert self.outputs is not None and self.capacity_changed is not None
        self._admissible = admissible
        self._pending_adds = max(0, self._pending_adds - adds_applied)
        if stats is not None:
            self._stats = stats
        if outputs:
            self.outputs.put_nowait(outputs)
        self.capacity_changed.set()

    def _died(self, error: str) -> None:
        self.error = error
        if self.dead is not None:
            self.dead.set()

    def num_admissible(self, priority: int = WORST) -> int:
        """What intake may still pull of `priority` (a lane's): the engine's last answer less the adds it has
        not seen yet (of any priority: an add takes a slot whatever its lane)."""
        return max(0, self._admissible[priority] - self._pending_adds)

    def stats(self) -> dict:
        return dict(self._stats)

    def add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
            priority: int = 1, tenant: str = "default") -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        """Stops the engine; requests still in it are left as they are."""
        raise NotImplementedError


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    tenant: str


def sequences_added(commands: list) -> int:
    """Sequences the adds among `commands` take (the engine admits sequences: a request runs n of them)."""
    return sum(c.sampling.num_sequences for c in commands if isinstance(c, _Add))


@dataclass
class _Abort:
    request_id: str


class EngineDriver:
    """Applies commands to an engine and runs its steps, failing requests rather than dying on an error;
    shared by the engine thread and the engine process."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.live: set[str] = set()  # added and not finished nor aborted
        self.steps = 0
        self.step_errors = 0

    def apply(self, commands: list[_Add | _Abort]) -> list[RequestOutput]:
        failed: list[RequestOutput] = []
        for c in commands:
            if isinstance(c, _Add):
                try:
                    self.engine.add_request(c.request_id, c.prompt_token_ids, c.sampling,
                                            priority=c.priority, tenant=c.tenant)
                    self.live.add(c.request_id)
                except Exception as e:  # a request the engine refuses fails alone
                    log.warning("add_request failed", job_id=c.request_id, error=repr(e))
                    failed.append(FailedOutput(c.request_id, [], "", finished=True, finish_reason="error",
                                               num_prompt_tokens=len(c.prompt_token_ids),
                                               error=f"engine refused the request: {e}",
                                               error_type=getattr(e, "error_type", "engine_error")))
            else:
                self.live.discard(c.request_id)
                try:
                    self.engine.abort_request(c.request_id)
                except Exception as e:
                    log.warning("abort_request failed", job_id=c.request_id, error=repr(e))
        return failed

    def step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            if not getattr(self.engine, "ranks_alive", True):
                raise  # a tensor-parallel rank is gone: no later step can run
            # A broken step must not kill the loop silently: fail what was running, keep serving.
            self.step_errors += 1
            log.error("engine step failed", error=repr(e), requests=len(self.live),
                      traceback=traceback.format_exc())
            failed: list[RequestOutput] = []
            for rid in sorted(self.live):
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    pass
                failed.append(FailedOutput(rid, [], "", finished=True, finish_reason="error",
                                           error=f"engine step failed: {e}"))
            self.live.clear()
            return failed
        self.steps += 1
        now = time.time()
        for out in outputs:
            out.produced_at = now
            if out.request_finished:
                self.live.discard(out.request_id)
        return outputs

    def snapshot(self) -> tuple[Admissible, dict]:
        try:
            return admissible_of(self.engine), self.engine.stats()
        except Exception as e:
            log.warning("engine stats failed", error=repr(e))
            return (0,) * len(PRIORITIES), dict(IDLE_STATS)

    def stats(self) -> dict:
        """The engine's stats alone (with the steps that raised, a lifetime total), for a caller that has its
        admissible counts already."""
        try:
            stats = self.engine.stats()
        except Exception as e:
            log.warning("engine stats failed", error=repr(e))
            stats = dict(IDLE_STATS)
        return {**stats, STEP_ERRORS_STAT: self.step_errors}


class EngineLoop(EngineHandle):
    """Runs an engine object's steps in a thread of this process."""

    def __init__(self, engine, name: str = "engine") -> None:
        super().__init__(name)
        self.engine = engine
        self.driver = EngineDriver(engine)
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def steps(self) -> int:
        return self.driver.steps

    @property
    def step_errors(self) -> int:
        return self.driver.step_errors

    def start(self) -> None:
        """Start the engine thread; call from inside the running asyncio loop that consumes outputs."""
        self._open(admissible_of(self.engine))
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
            priority: int = 1, tenant: str = "default") -> None:
        with self._cond:
            self._inbox.append(_Add(request_id, prompt_token_ids, sampling, priority, tenant))
            self._pending_adds += sampling.num_sequences
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still in the engine are left as they are."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the engine itself is broken (not one step): the worker must exit
            log.critical("engine loop died", error=repr(e), traceback=traceback.format_exc())
            self._call(self._died, repr(e))

    def _call(self, fn, *args) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the asyncio loop is closed: nobody is left to take outputs
            return False

    def _serve(self) -> None:
        engine = self.engine
        last_admissible: Admissible = ()
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not engine.has_unfinished_requests():
                    self._cond.wait()  # idle: block, never spin
                if self._stopping:
                    return
                commands, self._inbox = self._inbox, []
            outputs = self.driver.apply(commands)
            if engine.has_unfinished_requests():
                outputs.extend(self.driver.step())
            admissible, stats = self.driver.snapshot()
            adds = sequences_added(commands)
            if outputs or adds or admissible != last_admissible:  # a prefill chunk alone wakes nobody
                last_admissible = admissible
                if not self._call(self._received, outputs, admissible, adds, stats):
                    return
