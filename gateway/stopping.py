"""The gateway process's "stopping" signal for its open streams. uvicorn, told to stop (SIGTERM, Ctrl-C),
waits for open connections to close and cancels what is left after its grace; a stream follows its job
for as long as the job runs, so each would be cut mid-write and logged as a failed request. Chained to
uvicorn's own signal handlers, this ends each stream at once instead, with a last event saying why."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

# How long uvicorn lets open connections finish once told to stop, before it cancels them.
SERVER_GRACE_S = 5.0
# How long of that a response waiting for its job's end keeps waiting: the rest is for its answer to go out.
WAIT_GRACE_S = SERVER_GRACE_S - 2.0
# How long the gateway's stop waits, after its connections closed, for the cancels of jobs whose waiting
# clients were told to retry (Canceller.settle).
CANCEL_SETTLE_S = 5.0
# What a client is told, as the error a cut stream ends with or as a waiting completion's 503.
STOPPING_MESSAGE = "the gateway is stopping; retry the request (with its Idempotency-Key, if it had one)"

_watched: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stopping() -> asyncio.Event | None:
    """Set when this process was told to stop; None where nothing watches this loop (a server on a thread,
    an app under test)."""
    if _watched is None:
        return None
    loop, event = _watched
    try:
        return event if asyncio.get_running_loop() is loop else None
    except RuntimeError:
        return None


def watch(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Chains SIGTERM and SIGINT to the handlers in place (uvicorn's, at the app's startup); returns what puts
    them back (at its shutdown)."""
    global _watched
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    event = asyncio.Event()
    _watched = (loop, event)
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(event.set)
        if callable(previous := before[signum]):
            previous(signum, frame)

    for sig in _SIGNALS:
        signal.signal(sig, handler)

    def unwatch() -> None:
        global _watched
        _watched = None
        for sig, previous in before.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)
    return unwatch
