"""The engine process's command loop (worker/engine_process.serve_commands) over a real pipe, with an engine
double that always has work: a worker that stops reading makes the engine's sends block, and the time they
block is reported in the stats."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from worker.engine.outputs import RequestOutput
from worker.engine_loop import PRIORITIES
from worker.engine_process import _OUT, _STOP, REPORT_SEND_STAT, serve_commands

PAYLOAD = "x" * 20_000  # a report far bigger than a real step's, so the pipe fills in a few steps


class BusyEngine:
    """Always one request running; every step reports a big text delta."""

    def __init__(self) -> None:
        self.steps = 0

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        return [RequestOutput("job-1", [1], PAYLOAD, num_output_tokens=self.steps)]

    def num_admissible(self, priority: int) -> int:
        return 1

    def stats(self) -> dict:
        return {"running": 1, "waiting": 0, "kv_usage": 0.0}


def test_blocked_sends_are_reported_in_the_stats():
    worker_end, engine_end = mp.Pipe(duplex=True)
    engine = BusyEngine()
    loop = threading.Thread(target=serve_commands, args=(engine_end, engine), daemon=True)
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
    worker_end.send((_STOP,))
    loop.join(10)
    assert not loop.is_alive()
    assert reports == sorted(reports)  # a lifetime total
    assert reports[0] == 0.0
    # Most of the stall was spent blocked in a send, and nothing stepped meanwhile beyond what the pipe held.
    assert reports[-1] >= stall_s / 2
    assert steps_while_stalled < 200
