"""The engine in its own process (rank 0 of its tensor-parallel group), driven over a pipe.

The worker process sends commands (add, abort, stop) and receives one message per engine step: the step's
outputs and the engine's snapshot (admissible requests, stats). Messages are plain tuples, pickled, framed
as multiprocessing's Connection frames them, over a socket pair: no third-party codec, and for the sizes a
step carries (a few hundred outputs) encoding costs microseconds per output. The worker reads and writes
them with asyncio streams; the engine process polls its blocking Connection between steps and blocks on
it when idle, and its reports go out without blocking a step (ReportSender): a worker a few steps behind
costs the engine nothing, up to a bound.

An engine process that dies (a crash, a lost tensor-parallel rank, OOM) closes the pipe: the worker sees
end-of-file, marks the handle dead and exits non-zero; its running jobs' leases lapse (or are handed back)
and other workers rerun them. An engine that cannot start with its settings (a KV cache too small for one
sequence) says which, and its worker exits as a bad flag does (tokenq/flag_checks.EXIT_SETTINGS).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from protocol.sampling import SamplingParams
from protocol.workers import ModelCard
from tokenq.logs import configure_logging, get_logger
from tokenq.settings import Settings
from worker.engine.config import ConfigError
from worker.engine.outputs import RequestOutput, TokenLogprobs
from worker.engine_loop import (
    PRIORITIES,
    Admissible,
    EngineDriver,
    EngineHandle,
    FailedOutput,
    _Abort,
    _Add,
    admissible_of,
    sequences_added,
)

log = get_logger("engine_process")

REPORT_SEND_STAT = "report_send_seconds"  # lifetime total (see serve_commands)
STATS_INTERVAL_S = 0.5  # an engine with nothing new to say still refreshes the heartbeat's stats this often
# GNU OpenMP's spins before a waiting thread sleeps: enough for a step's parallel regions to hand off without
# sleeping on an idle machine, a hundredth of libgomp's own default so that threads finding the cores taken
# sleep soon (docs/BENCHMARKS.md). The user's own OpenMP settings win.
CPU_OMP_SPIN_COUNT = 3000
OMP_WAIT_VARS = frozenset({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
_ADD, _ABORT, _STOP = "add", "abort", "stop"
_READY, _FAILED, _OUT = "ready", "failed", "out"


@dataclass
class EngineSpec:
    """What the engine process builds its engine from (picklable: it crosses to a spawned process)."""

    model_path: str
    config: Any  # worker.engine.config.EngineConfig (kept lazy: the worker process imports no torch)
    served_name: str


@dataclass
class EngineInfo:
    """What the engine reports once it is ready."""

    card: ModelCard
    max_model_len: int
    max_num_seqs: int
    device: str
    admissible: Admissible
    kv_blocks: int = 0
    block_size: int = 0


# ---- encoding: RequestOutput <-> plain tuples ----------------------------------------------------------

def _lps(items):
    return [(lp.token_id, lp.logprob, lp.top) if lp is not None else None for lp in items] if items is not None else None


def _from_lps(rows):
    return [TokenLogprobs(*r) if r is not None else None for r in rows] if rows is not None else None


def encode_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    return [(o.request_id, o.new_token_ids, o.text_delta, o.finished, o.finish_reason, o.num_prompt_tokens,
             o.num_output_tokens, o.num_cached_tokens, _lps(o.logprobs), _lps(o.prompt_logprobs), o.produced_at,
             o.index, o.stop_reason, o.choices_left,
             (o.error, o.error_type) if isinstance(o, FailedOutput) else None)
            for o in outputs]


def decode_outputs(rows: list[tuple]) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for (rid, ids, text, finished, reason, n_prompt, n_out, n_cached, lps, prompt_lps, at, index, stop_reason,
         choices_left, error) in rows:
        fields = dict(finished=finished, finish_reason=reason, num_prompt_tokens=n_prompt, num_output_tokens=n_out,
                      num_cached_tokens=n_cached, logprobs=_from_lps(lps), prompt_logprobs=_from_lps(prompt_lps),
                      produced_at=at, index=index, stop_reason=stop_reason, choices_left=choices_left)
        if error is not None:
            outputs.append(FailedOutput(rid, ids, text, **fields, error=error[0], error_type=error[1]))
        else:
            outputs.append(RequestOutput(rid, ids, text, **fields))
    return outputs


def encode_sampling(sp: SamplingParams) -> dict:
    return sp.model_dump()


def frame(message: tuple) -> bytes:
    """One message as Connection frames it, so either end may read it with Connection.recv: a 4-byte
    big-endian length (or -1 and an 8-byte one, past 2 GiB), then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    size = struct.pack("!i", len(data)) if len(data) <= 0x7FFFFFFF else struct.pack("!iQ", -1, len(data))
    return size + data


# ---- the worker's side ---------------------------------------------------------------------------------

class EngineProcess(EngineHandle):
    def __init__(self, spec: EngineSpec, stall_s: float | None = None) -> None:
        super().__init__(spec.served_name)
        self.spec = spec
        self.stall_s = Settings.from_env().engine_stall_s if stall_s is None else stall_s
        self._last_report = 0.0  # when the engine last reported, or was given work while it had none
        self._stall_task: asyncio.Task | None = None
        self.info: EngineInfo | None = None
        self._proc: mp.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._ready: asyncio.Future[EngineInfo] | None = None

    async def start(self) -> EngineInfo:
        """Starts the engine process and waits until its engine is built (weights, KV cache, graphs)."""
        self._open((0,) * len(PRIORITIES))
        assert self._loop is not None
        ctx = mp.get_context("spawn")  # CUDA cannot be forked; the child imports only what it needs
        parent, child = ctx.Pipe(duplex=True)  # a socket pair; the child keeps the blocking Connection
        if not str(self.spec.config.device).startswith("cuda") and not OMP_WAIT_VARS & os.environ.keys():
            # A CPU engine's OpenMP threads spin briefly at the end of a parallel region, then sleep (unless
            # the user chose otherwise): they share the cores with the worker, the gateway and Redis, and
            # threads that spin on outnumber free cores and stall each other, while threads that sleep at
            # once pay a wake-up at each of a step's hundreds of regions (docs/BENCHMARKS.md). The child
            # (and its ranks) inherit it; OpenMP reads it once, when torch loads.
            os.environ.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT=str(CPU_OMP_SPIN_COUNT))
        self._proc = ctx.Process(target=engine_main, args=(child, self.spec), name=f"tokenq-engine-{self.name}")
        self._proc.start()
        child.close()
        # This side reads and writes the same frames through asyncio's streams: an event loop (uvloop) puts
        # the socket in non-blocking mode, where Connection.recv could stop mid-message.
        sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        reader, self._writer = await asyncio.open_connection(sock=sock)
        self._ready = self._loop.create_future()
        self._read_task = asyncio.create_task(self._read(reader), name="engine-reader")
        try:
            self.info = await self._ready
        except BaseException:
            await self.close()
            raise
        self._admissible = self.info.admissible
        self._stall_task = asyncio.create_task(self._watch_for_stall(), name="engine-stall-watch")
        return self.info

    def add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
            priority: int = 1, tenant: str = "default") -> None:
        if not self._busy():
            self._last_report = time.monotonic()  # the time it sat idle is no stall
        self._pending_adds += sampling.num_sequences
        self._send((_ADD, request_id, prompt_token_ids, encode_sampling(sampling), priority, tenant))

    def abort(self, request_id: str) -> None:
        self._send((_ABORT, request_id))

    def _send(self, msg: tuple) -> None:
        """Queues one frame; never blocks."""
        if self._writer is None or self._writer.is_closing() or (self.dead is not None and self.dead.is_set()):
            return
        self._writer.write(frame(msg))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = struct.unpack("!i", await reader.readexactly(4))
                if size == -1:  # Connection's frame for a message over 2 GiB
                    (size,) = struct.unpack("!Q", await reader.readexactly(8))
                self._handle(pickle.loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            code = await asyncio.to_thread(self._exitcode)
            self._lost(f"engine process exited (code {code}): {e!r}")

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == _OUT:
            self._last_report = time.monotonic()
            _, rows, admissible, adds_applied, stats = msg
            self._received(decode_outputs(rows), admissible, adds_applied, stats)
        elif kind == _READY:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg[1])
        elif kind == _FAILED:
            _, error, setting = msg
            if setting is not None and self._ready is not None and not self._ready.done():
                self._ready.set_exception(ConfigError(*setting))  # the worker says it, as a bad flag
                return
            self._lost(f"engine failed: {error}")

    def _busy(self) -> bool:
        stats = self._stats
        return self._pending_adds > 0 or stats.get("running", 0) + stats.get("waiting", 0) > 0

    async def _watch_for_stall(self) -> None:
        """An engine with requests in it reports after every step; none for `stall_s` is a step that does not
        end (a rank stopped, or stuck in a collective, which waits without a timeout): the engine's process
        group (its ranks too) is killed and the handle is dead, as for an engine that died, so that the worker
        hands its jobs back and exits instead of holding them, renewing their leases, for good."""
        while self.dead is not None and not self.dead.is_set():
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            if self._busy() and time.monotonic() - self._last_report > self.stall_s:
                self._kill_group()
                self._lost(f"engine stalled: no report for {self.stall_s:g} s with requests in it")
                return

    def _kill_group(self) -> None:
        if self._proc is None or self._proc.pid is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # engine_main made its process a group's leader
        except (ProcessLookupError, PermissionError):
            pass

    def _exitcode(self) -> int | None:
        if self._proc is None:
            return None
        self._proc.join(timeout=1.0)
        return self._proc.exitcode

    def _lost(self, error: str) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(error))
        if self.dead is not None and not self.dead.is_set():
            log.critical("engine process lost", error=error)
            self._died(error)

    async def close(self, timeout: float = 30.0) -> None:
        """Asks the engine process to stop (it stops its other ranks) and waits for it; kills it after
        `timeout`. Requests still in the engine are dropped with it."""
        for task in (self._read_task, self._stall_task):
            if task is not None:
                task.cancel()
        writer, proc = self._writer, self._proc
        if writer is not None and not writer.is_closing():
            self._send((_STOP,))
            try:
                await asyncio.wait_for(writer.drain(), 5.0)
            except (ConnectionError, OSError, TimeoutError):
                pass
        if proc is not None:
            await asyncio.to_thread(_join_or_kill, proc, timeout)
        if writer is not None:
            writer.close()
        self._writer = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not (self.dead and self.dead.is_set())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def _join_or_kill(proc: mp.process.BaseProcess, timeout: float) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)


# ---- the engine process --------------------------------------------------------------------------------

def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The engine process: build the engine, report ready, then serve commands and steps until told to stop
    or the worker is gone. SIGINT and SIGTERM are the worker's to act on (it drains, then stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    from worker.engine.llm_engine import LLMEngine
    from worker.engine.tp_ranks import exit_with_parent

    configure_logging("engine")  # a spawned process starts with structlog's defaults
    os.setpgid(0, 0)  # a group of its own, which its ranks join: a stalled engine is killed with them
    exit_with_parent()
    try:
        started = time.monotonic()
        engine = LLMEngine(spec.model_path, spec.config)
        log.info("model loaded", model=spec.served_name, path=spec.model_path, device=str(engine.device),
                 seconds=round(time.monotonic() - started, 2))
        info = EngineInfo(card=engine.model_card(spec.served_name), max_model_len=engine.max_model_len,
                          max_num_seqs=engine.config.max_num_seqs, device=str(engine.device),
                          admissible=admissible_of(engine), kv_blocks=len(engine.block_manager.blocks),
                          block_size=engine.config.block_size)
    except ConfigError as e:  # the user's setting: one line, no traceback
        conn.send((_FAILED, str(e), (e.field, e.reason)))
        return
    except BaseException as e:
        conn.send((_FAILED, f"{e!r}\n{traceback.format_exc()}", None))
        raise
    conn.send((_READY, info))
    try:
        serve_commands(conn, engine)
    finally:
        engine.close()


class ReportSender:
    """The engine's reports to the worker, framed as Connection frames them, sent without blocking a step:
    what the socket does not take at once waits here and goes out as the worker reads, between steps. A
    worker that falls behind for a few steps (its Redis writes) then costs no step; only past `limit` unsent
    bytes does a report wait for it (backpressure), and that wait is `blocked_s`."""

    def __init__(self, conn: Connection, limit: int) -> None:
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))  # MSG_DONTWAIT per call: conn stays blocking
        self._pending = bytearray()
        self._limit = limit
        self.blocked_s = 0.0

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def send(self, message: tuple) -> None:
        self._pending += frame(message)
        self.flush()
        if len(self._pending) > self._limit:
            started = time.perf_counter()
            self.flush(wait_s=math.inf)
            self.blocked_s += time.perf_counter() - started

    def flush(self, wait_s: float = 0.0) -> None:
        """Sends what the socket takes now; with wait_s, waits up to that long for the worker to take the rest.
        (The fd stays blocking, for conn: each send says MSG_DONTWAIT instead.)"""
        deadline = time.monotonic() + wait_s
        while self._pending:
            try:
                sent = self._sock.send(self._pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                select.select([], [self._sock], [], None if left == math.inf else left)
                continue
            del self._pending[:sent]

    def wait_idle(self, conn: Connection, timeout: float) -> bool:
        """An idle engine's wait: until a command arrives (True) or `timeout` passes (False), sending what
        is pending meanwhile."""
        while self._pending:
            readable, writable, _ = select.select([conn], [self._sock], [], timeout)
            if readable:
                return True
            if not writable:
                return False
            self.flush()
        return conn.poll(timeout)

    def close(self) -> None:
        self._sock.close()


REPORT_BUFFER_BYTES = 64 << 20  # reports the worker has not taken, before the engine waits for it
STOP_FLUSH_S = 5.0  # told to stop, the engine waits this long at most for the worker to take the last reports


def serve_commands(conn: Connection, engine, report_buffer_bytes: int = REPORT_BUFFER_BYTES) -> None:
    """Serves until told to stop or the worker is gone: a worker killed mid-step closes the pipe under a
    report (a broken pipe) or under a read (EOF), and either ends the engine quietly; the worker's jobs go to
    recovery, as a lapsed lease sends them."""
    sender = ReportSender(conn, report_buffer_bytes)
    try:
        _serve(conn, engine, sender)
    except (BrokenPipeError, ConnectionResetError):
        log.warning("the worker is gone; the engine stops")
    finally:
        sender.close()


def _serve(conn: Connection, engine, sender: ReportSender) -> None:
    driver = EngineDriver(engine)
    last_admissible: Admissible = ()
    last_report = 0.0
    while True:
        if sender.pending:
            sender.flush()
        if not engine.has_unfinished_requests() and not sender.wait_idle(conn, STATS_INTERVAL_S):
            if not engine.ranks_alive:  # found now, not by the next request's failed step
                raise RuntimeError("a tensor-parallel rank exited while the engine was idle")
            continue  # idle: block on the pipe, never spin
        commands: list[_Add | _Abort] = []
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == _ADD:
                    _, rid, ids, sampling, priority, tenant = msg
                    commands.append(_Add(rid, ids, SamplingParams.model_validate(sampling), priority, tenant))
                elif msg[0] == _ABORT:
                    commands.append(_Abort(msg[1]))
                else:
                    sender.flush(wait_s=STOP_FLUSH_S)  # told to stop: the last reports still go out
                    return
        except EOFError:  # the worker is gone
            log.warning("the worker is gone; the engine stops")
            return
        outputs = driver.apply(commands)
        if engine.has_unfinished_requests():
            outputs.extend(driver.step())
        adds = sequences_added(commands)
        now = time.monotonic()
        admissible = admissible_of(engine)
        if outputs or adds or admissible != last_admissible or now - last_report >= STATS_INTERVAL_S:
            stats = driver.stats()
            # The time steps waited for the worker to take reports (as of the report before), a lifetime total
            # the worker turns into a counter.
            stats[REPORT_SEND_STAT] = sender.blocked_s
            last_admissible, last_report = admissible, now
            sender.send((_OUT, encode_outputs(outputs), admissible, adds, stats))
