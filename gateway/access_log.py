"""One log line per HTTP request (method, path, status, duration, bytes sent, client), written when the
answer ends, streams included; on by default, TOKENQ_ACCESS_LOG=0 turns it off (Settings.access_log). A health
probe that succeeds is a debug line: probes come every few seconds from a load balancer or an orchestrator (every
0.3 s from `tokenq up` while its worker starts) and say nothing while they pass."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

from tokenq.logs import get_logger

_log = get_logger("access")

App = Callable[[Scope, Receive, Send], Awaitable[None]]
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection before the answer
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


async def logged(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """Run app on one HTTP request and log it (the query string is left out: it may carry secrets)."""
    start = time.perf_counter()
    status = 0
    sent = 0

    async def send_wrapper(message: Message) -> None:
        nonlocal status, sent
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            sent += len(message.get("body", b""))
        await send(message)

    unanswered = 500  # the app raised before it answered
    try:
        await app(scope, receive, send_wrapper)
        unanswered = CLIENT_CLOSED  # the app returned without an answer: the client left first
    finally:
        client = scope.get("client")
        status = status or unanswered
        line = _log.debug if scope["path"] in PROBE_PATHS and status < 400 else _log.info
        line("request", method=scope["method"], path=scope["path"], status=status,
             ms=round((time.perf_counter() - start) * 1000, 2), bytes=sent, client=client[0] if client else None)
