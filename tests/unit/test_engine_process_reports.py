"""The engine process's command loop (worker/engine_process.serve_commands) over a real pipe, with an engine
double that always has work: a worker that stops reading costs no step while the unsent reports fit the
engine's buffer, every report still arrives, in order; past the buffer the engine waits, and the time it
waits is reported in the stats."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from worker import engine_process
from worker.engine.outputs import RequestOutput
from worker.engine_loop import PRIORITIES
from worker.engine_process import _OUT, _STOP, REPORT_SEND_STAT, serve_commands

PAYLOAD = "x" * 20_000  # a report far bigger than a real step's, so the pipe fills in a few steps


class BusyEngine:
    """Always one request running; every step reports a big text delta."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.steps = 0
        self.step_s = step_s

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        self.steps += 1
        return [RequestOutput("job-1", [1], PAYLOAD, num_output_tokens=self.steps)]

    def num_admissible(self, priority: int) -> int:
        return 1

    def stats(self) -> dict:
        return {"running": 1, "waiting": 0, "kv_usage": 0.0}


def stop(worker_end, loop: threading.Thread) -> None:
    """Tells the loop to stop and reads on until it has, as the worker's reader does: its last reports may
    still be on their way."""
    worker_end.send((_STOP,))
    deadline = time.monotonic() + 20
    while loop.is_alive() and time.monotonic() < deadline:
        if worker_end.poll(0.05):
            worker_end.recv()
    assert not loop.is_alive()


def test_blocked_sends_are_reported_in_the_stats():
    worker_end, engine_end = mp.Pipe(duplex=True)
    engine = BusyEngine()
    # No buffer of the engine's own: a report waits as soon as the socket holds no more.
    loop = threading.Thread(target=serve_commands, args=(engine_end, engine, 0), daemon=True)
    loop.start()
    stall_s = 0.6
    time.sleep(stall_s)  # the worker reads nothing: the pipe fills and the engine's send blocks
    steps_while_stalled = engine.steps
    reports = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = worker_end.recv()
        assert msg[0] == _OUT and len(msg[2]) == len(PRIORITIES)
        reports.append(msg[4][REPORT_SEND_STAT])
        if len(reports) > steps_while_stalled + 2:
            break
    stop(worker_end, loop)
    assert reports == sorted(reports)  # a lifetime total
    assert reports[0] == 0.0
    # Most of the stall was spent blocked in a send, and nothing stepped meanwhile beyond what the pipe held.
    assert reports[-1] >= stall_s / 2
    assert steps_while_stalled < 200


def test_a_worker_behind_costs_no_step_and_loses_no_report():
    worker_end, engine_end = mp.Pipe(duplex=True)
    engine = BusyEngine(step_s=0.002)
    loop = threading.Thread(target=serve_commands, args=(engine_end, engine), daemon=True)
    loop.start()
    time.sleep(0.5)  # the worker reads nothing: far more reports than the socket holds
    steps_while_stalled = engine.steps
    seen: list[int] = []
    blocked: list[float] = []
    while len(seen) < steps_while_stalled + 5:
        msg = worker_end.recv()
        seen += [row[6] for row in msg[1]]  # num_output_tokens: the step that made it
        blocked.append(msg[4][REPORT_SEND_STAT])
    stop(worker_end, loop)
    # The engine kept stepping (the socket holds about 10 of these reports) and never waited...
    assert steps_while_stalled > 50
    assert max(blocked) == 0.0
    # ...and every step's output arrived once, in order.
    assert seen == list(range(1, len(seen) + 1))


def test_a_stop_waits_for_a_worker_that_reads_no_more_only_so_long(monkeypatch):
    monkeypatch.setattr(engine_process, "STOP_FLUSH_S", 0.3)
    worker_end, engine_end = mp.Pipe(duplex=True)
    engine = BusyEngine(step_s=0.001)
    loop = threading.Thread(target=serve_commands, args=(engine_end, engine), daemon=True)
    loop.start()
    time.sleep(0.3)  # unread reports pile up past what the socket holds
    worker_end.send((_STOP,))
    loop.join(5)
    assert not loop.is_alive()


def test_a_failed_output_crosses_the_pipe_with_its_reason_and_type():
    from worker.engine.outputs import FailedOutput
    from worker.engine_process import decode_outputs, encode_outputs

    sent = [FailedOutput("a", [], "", finished=True, finish_reason="error", error="bad regex",
                         error_type="invalid_request_error"),
            FailedOutput("b", [], "", finished=True, finish_reason="error", error="oom"),
            RequestOutput("c", [1], "x", num_output_tokens=1)]
    got = decode_outputs(encode_outputs(sent))
    assert [(type(o), getattr(o, "error", None), getattr(o, "error_type", None)) for o in got] == [
        (FailedOutput, "bad regex", "invalid_request_error"), (FailedOutput, "oom", "engine_error"),
        (RequestOutput, None, None)]


def test_a_worker_gone_mid_step_ends_the_loop_without_an_error():
    """The worker killed (kill -9) while the engine steps: its end of the pipe closes, and the engine's next
    report meets a broken pipe, which ends the loop as a stop does, not with a traceback."""
    worker_end, engine_end = mp.Pipe(duplex=True)
    engine = BusyEngine(step_s=0.001)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve_commands(engine_end, engine, 0)
        except BaseException as e:  # noqa: BLE001 - the test reports what escaped
            errors.append(e)

    loop = threading.Thread(target=run, daemon=True)
    loop.start()
    time.sleep(0.2)
    worker_end.close()
    loop.join(10)
    assert not loop.is_alive() and errors == []
