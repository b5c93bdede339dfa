"""Runs the gateway under uvicorn (the `tokenq gateway` command calls this).

`TOKENQ_GATEWAY_WORKERS` (default 1) runs that many gateway processes on the one port: the gateway keeps
no state of its own (limits, keys and jobs live in Redis), so they share the load like separate hosts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.connection_limits import GuardedHttpProtocol
from gateway.logging import uvicorn_log_config
from gateway.metrics import MULTIPROC_DIR_ENV
from gateway.stopping import SERVER_GRACE_S
from tokenq.settings import Settings

WORKERS_ENV = "TOKENQ_GATEWAY_WORKERS"
_REDIS_URL_ENV = "TOKENQ_GATEWAY_REDIS_URL"  # how `run` hands the URL to worker processes


class _CoalescingTransport:
    """A response's head and what follows it in the same loop iteration go to the socket in one write:
    uvicorn writes a response's head and body separately, and under uvloop each write is a system call that
    wakes the client, so a small answer cost two of each. Only the head waits (for its body, until the end
    of the iteration at most); any other write goes out at once with what waits before it, so a stream's
    chunk (a first token) waits for no loop iteration."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not data.startswith(b"HTTP/"):  # a body: out now, after the head that waits for it
            self._flush()
        elif len(self._out) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(GuardedHttpProtocol):
    """uvicorn's httptools protocol, with the connection limits, on a write-coalescing transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def run(host: str, port: int, redis_url: str, workers: int | None = None) -> None:
    settings = Settings.from_env()
    workers = workers or settings.gateway_workers
    options: dict[str, Any] = dict(host=host, port=port, log_level=settings.log_level.lower(), access_log=False,
                                   timeout_graceful_shutdown=SERVER_GRACE_S, loop="uvloop", http=HttpProtocol)
    if (log_config := uvicorn_log_config()) is not None:
        options["log_config"] = log_config
    _exit_cleanly_after_shutdown()
    if workers <= 1:
        uvicorn.run(create_app(redis_url), **options)
        return
    os.environ[_REDIS_URL_ENV] = redis_url
    with _shared_metrics_dir():
        uvicorn.run("gateway.server:app_from_env", factory=True, workers=workers, **options)


@contextlib.contextmanager
def _shared_metrics_dir() -> Iterator[None]:
    """A fresh directory where the gateway processes keep their metrics (gateway/metrics.py), unless the
    operator named one; the processes are spawned, so they read it from the environment at import."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tokenq-gateway-metrics-") as path:
        os.environ[MULTIPROC_DIR_ENV] = path
        try:
            yield
        finally:
            del os.environ[MULTIPROC_DIR_ENV]


def _exit_cleanly_after_shutdown() -> None:
    """uvicorn serves with its own signal handlers and, after a graceful shutdown, raises the signal it
    caught again under the handlers it found: with the defaults a drained gateway then died of SIGTERM
    (exit -15) and supervisors and orchestrators logged a crash. These handlers make that second delivery
    a no-op, so a SIGTERM or Ctrl-C that uvicorn handled ends in exit status 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def app_from_env():
    """The app factory of each worker process."""
    return create_app(os.environ[_REDIS_URL_ENV])
