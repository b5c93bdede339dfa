"""Runs the engine's step loop in a thread of its own, so that the GPU never waits on the network.

The asyncio side sends commands (add, abort) into a thread-safe inbox; the engine thread drains it
between steps and hands each step's outputs back to the asyncio loop as one batch. All calls into the
engine happen on the engine thread; the asyncio side reads only snapshots taken there.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import dataclass

from protocol.sampling import SamplingParams
from worker.engine.outputs import FailedOutput, RequestOutput
from worker.logging import get_logger

log = get_logger("engine_loop")

# The asyncio thread wakes for a batch while the engine thread is already launching the next step in Python,
# and the two then share the GIL while the batch is written to Redis. For a batch that carries a first token
# or an end, at light load, the engine thread instead waits (without the GIL) until the asyncio side has
# taken the batch, or, where the consumer says so (`wait_for_written`, the publisher), until it has written
# the batch out: the GPU still has the step launched before this one to run, so the pause costs no GPU
# time. At heavier load, time to first token is mostly queueing and the host's time goes to the GPU.
HANDOFF_MAX_OUTPUTS = 16
HANDOFF_WAIT_S = 0.002
# The same sharing at the other end: a request added to an idle engine is prefilled by the very next step,
# whose host side (inputs, graph launch) is on its time to first token. Intake waits for that launch, at
# most this long, before it does the job's Redis work (the start script, the next read); the round trips
# then overlap the prefill on the GPU instead of the launch on the host.
LAUNCH_WAIT_S = 0.003


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    tenant: str


@dataclass
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(self, engine, name: str = "engine") -> None:
        self.engine = engine
        self.name = name
        self.outputs: asyncio.Queue[list[RequestOutput]] | None = None
        self.capacity_changed: asyncio.Event | None = None  # set after every batch (intake waits on it)
        self.dead: asyncio.Event | None = None  # set if the engine thread exits on an error
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._pending_adds = 0  # adds in the inbox, not yet counted by engine.num_admissible()
        self._admissible = 0
        self._stats: dict = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prefix_hit_rate": 0.0}
        self._live: set[str] = set()  # added and not finished nor aborted (engine thread only)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_errors = 0
        self.handoffs = 0  # batches the engine thread waited on (for the asyncio side to take or write them)
        self.handoffs_late = 0  # of those, the ones not taken (or written) within HANDOFF_WAIT_S
        self.wait_for_written = False  # set by a consumer that calls written() after each batch it took
        self._handoff: threading.Event | None = None  # what the engine thread waits on now
        self._idle = False  # the engine thread is blocked with nothing to run
        self._launch_waiters: list[asyncio.Future[None]] = []  # resolved after the next step is launched

    # ---- asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from inside the running asyncio loop that consumes outputs."""
        self._loop = asyncio.get_running_loop()
        self.outputs = asyncio.Queue()
        self.capacity_changed = asyncio.Event()
        self.dead = asyncio.Event()
        self._admissible = self.engine.num_admissible()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
            priority: int = 1, tenant: str = "default") -> None:
        with self._cond:
            self._inbox.append(_Add(request_id, prompt_token_ids, sampling, priority, tenant))
            self._pending_adds += 1
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    @property
    def idle(self) -> bool:
        """True while the engine thread waits for work: an add now is launched by the very next step."""
        with self._cond:
            return self._idle and not self._inbox

    def watch_launch(self) -> asyncio.Future[None]:
        """A future resolved once the engine thread has launched a step begun after this call: take it
        before the add whose launch it waits for."""
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._launch_waiters.append(future)
        return future

    async def wait_launch(self, future: asyncio.Future[None], timeout: float | None = None) -> bool:
        """Waits for a `watch_launch` future: True when the step was launched, False after `timeout`
        (default LAUNCH_WAIT_S)."""
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(LAUNCH_WAIT_S if timeout is None else timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            with self._cond:
                if future in self._launch_waiters:
                    self._launch_waiters.remove(future)

    def written(self) -> None:
        """The consumer has written out what it took: an engine thread waiting on a handoff goes on."""
        handoff = self._handoff
        if handoff is not None:
            handoff.set()

    def num_admissible(self) -> int:
        """What intake may still pull: the engine's last answer less the adds it has not seen yet."""
        with self._cond:
            return max(0, self._admissible - self._pending_adds)

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

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

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the engine itself is broken (not one step): the worker must exit
            log.critical("engine loop died", error=repr(e), traceback=traceback.format_exc())
            self.error = repr(e)
            assert self._loop is not None and self.dead is not None
            try:
                self._loop.call_soon_threadsafe(self.dead.set)
            except RuntimeError:
                pass

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not engine.has_unfinished_requests():
                    self._idle = True
                    self._cond.wait()  # idle: block, never spin
                self._idle = False
                if self._stopping:
                    return
                commands, self._inbox = self._inbox, []
            failed = self._apply(commands)
            outputs: list[RequestOutput] = list(failed)
            if engine.has_unfinished_requests():
                outputs.extend(self._step())
            self._wake_launch_waiters()
            freed = self._snapshot(sum(isinstance(c, _Add) for c in commands))
            if outputs or freed:  # a step with nothing to say (a prefill chunk) wakes nobody
                self._deliver(outputs)

    def _apply(self, commands: list[_Add | _Abort]) -> list[RequestOutput]:
        failed: list[RequestOutput] = []
        for c in commands:
            if isinstance(c, _Add):
                try:
                    self.engine.add_request(c.request_id, c.prompt_token_ids, c.sampling,
                                            priority=c.priority, tenant=c.tenant)
                    self._live.add(c.request_id)
                except Exception as e:  # a request the engine refuses fails alone
                    log.warning("add_request failed", job_id=c.request_id, error=repr(e))
                    failed.append(FailedOutput(c.request_id, [], "", finished=True, finish_reason="error",
                                               num_prompt_tokens=len(c.prompt_token_ids),
                                               error=f"engine refused the request: {e}"))
            else:
                self._live.discard(c.request_id)
                try:
                    self.engine.abort_request(c.request_id)
                except Exception as e:
                    log.warning("abort_request failed", job_id=c.request_id, error=repr(e))
        return failed

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # A broken step must not kill the loop silently: fail what was running, keep serving.
            self.step_errors += 1
            log.error("engine step failed", error=repr(e), requests=len(self._live),
                      traceback=traceback.format_exc())
            failed: list[RequestOutput] = []
            for rid in sorted(self._live):
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    pass
                failed.append(FailedOutput(rid, [], "", finished=True, finish_reason="error",
                                           error=f"engine step failed: {e}"))
            self._live.clear()
            return failed
        self.steps += 1
        now = time.time()
        for out in outputs:
            out.produced_at = now
            if out.finished:
                self._live.discard(out.request_id)
        return outputs

    def _wake_launch_waiters(self) -> None:
        if not self._launch_waiters:  # every step passes here: no lock unless someone waits
            return
        with self._cond:
            if not self._launch_waiters:
                return
            waiters, self._launch_waiters = self._launch_waiters, []
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve_all, waiters)
        except RuntimeError:  # the asyncio loop is closed
            pass

    def _snapshot(self, adds_applied: int) -> bool:
        """Publishes what the engine can take and its stats; True when it can take more than before."""
        try:
            admissible = self.engine.num_admissible()
            stats = self.engine.stats()
        except Exception as e:
            log.warning("engine stats failed", error=repr(e))
            admissible, stats = 0, self._stats
        with self._cond:
            freed = admissible > self._admissible
            self._admissible = admissible
            self._pending_adds -= adds_applied
            self._stats = stats
        return freed

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        loop, queue, event = self._loop, self.outputs, self.capacity_changed
        assert loop is not None and queue is not None and event is not None
        taken = threading.Event() if self._hand_over(outputs) else None
        until_written = self.wait_for_written
        self._handoff = taken

        def put() -> None:
            if outputs:
                queue.put_nowait(outputs)
            event.set()
            if taken is not None and not until_written:
                taken.set()

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the asyncio loop is closed: nobody is left to take outputs
            return
        if taken is not None:
            self.handoffs += 1
            if not taken.wait(HANDOFF_WAIT_S):
                self.handoffs_late += 1
            self._handoff = None

    @staticmethod
    def _hand_over(outputs: list[RequestOutput]) -> bool:
        return 0 < len(outputs) <= HANDOFF_MAX_OUTPUTS and any(out.urgent for out in outputs)


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
