"""tokenq up's Ctrl-C: the first stops the stack, a second reaches the worker (which then skips its grace)."""

from __future__ import annotations

import signal

from tokenq.supervisor import Child, StopSignal


class _Proc:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return None

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_the_first_signal_stops_the_stack_and_a_second_reaches_the_worker():
    worker = Child("worker", _Proc)  # type: ignore[arg-type]
    worker.start()
    stop = StopSignal(worker)
    assert not stop.stopping
    stop(signal.SIGINT, None)
    assert stop.stopping and worker.proc.signals == []  # the caller stops the roles in order
    stop(signal.SIGINT, None)
    assert worker.proc.signals == [signal.SIGTERM]


def test_a_second_signal_before_the_worker_started_is_no_error():
    stop = StopSignal(Child("worker", _Proc))  # type: ignore[arg-type]
    stop(signal.SIGTERM, None)
    stop(signal.SIGTERM, None)
    assert stop.stopping
