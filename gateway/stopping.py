"""The gateway process's "stopping" signal for its open streams. uvicorn, told to stop (SIGTERM, Ctrl-C),
waits for open connections to close and cancels what is left after its grace; a stream follows its job
for as long as the job runs, so each would be cut mid-write and logged as a failed request. Chained to
uvicorn's own signal handlers, this ends each stream at once instead, with a last event saying why."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

_stopping: asyncio.Event | None = None


def stopping() -> asyncio.Event | None:
    """Set when this process was told to stop; None where no handler watches (a server on a thread)."""
    return _stopping


def watch(loop: asyncio.AbstractEventLoop) -> None:
    """Chains SIGTERM and SIGINT to the handlers uvicorn installed (call it once they are: at startup)."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        return
    event = _stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = signal.getsignal(sig)

        def handler(signum: int, frame: Any, before: Any = before) -> None:
            loop.call_soon_threadsafe(event.set)
            if callable(before):
                before(signum, frame)

        signal.signal(sig, handler)
