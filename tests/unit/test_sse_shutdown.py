"""A stream the server cuts as it stops (uvicorn cancels what is still open after its grace) ends as a
closed connection, not as an exception uvicorn logs with its traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.sse import sse_response


def client_that_stays() -> tuple[dict, Callable, Callable, list[dict]]:
    """The ASGI side of a client that never leaves: (scope, receive, send, the messages sent to it)."""
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    return {"type": "http", "asgi": {"spec_version": "2.4"}, "path": "/v1/chat/completions"}, receive, send, sent


async def test_a_stream_cancelled_by_the_server_stopping_ends_quietly():
    async def endless():
        while True:
            yield "data: {}\n\n"
            await asyncio.sleep(0.01)

    sent: list[dict] = []
    never = asyncio.Event()

    async def receive() -> dict:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "path": "/v1/jobs/x/events"}
    task = asyncio.create_task(sse_response(endless())(scope, receive, send))
    while len(sent) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait_for(task, 5)  # returns: no CancelledError out of the app
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}  # a whole response


async def test_a_stream_ends_with_its_last_event_when_the_gateway_is_told_to_stop(monkeypatch):
    """SIGTERM or Ctrl-C sets gateway.stopping's event: every open stream sends its `on_stop` and ends, before
    the server's grace for open connections runs out."""
    from gateway import sse

    event = asyncio.Event()
    monkeypatch.setattr(sse, "stopping", lambda: event)

    async def endless():
        while True:
            yield "data: {}\n\n"
            await asyncio.sleep(0.01)

    scope, receive, send, sent = client_that_stays()
    task = asyncio.create_task(sse.sse_response(endless(), on_stop=sse.STOPPING_EVENT)(scope, receive, send))
    while len(sent) < 3:
        await asyncio.sleep(0.01)
    event.set()
    await asyncio.wait_for(task, 5)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert b"server_shutting_down" in bodies[-2] and bodies[-1] == b""


def test_the_stopping_signal_belongs_to_the_loop_that_watches():
    """An app started on another loop (a test's, a server on a thread) does not wait on this loop's event, and
    the app's shutdown puts the signal handlers back."""
    import signal

    from gateway import stopping

    before = signal.getsignal(signal.SIGTERM)

    async def watched() -> tuple:
        unwatch = stopping.watch(asyncio.get_running_loop())
        return stopping.stopping(), unwatch

    event, unwatch = asyncio.run(watched())
    assert isinstance(event, asyncio.Event) and signal.getsignal(signal.SIGTERM) is not before

    async def elsewhere() -> asyncio.Event | None:
        return stopping.stopping()

    assert asyncio.run(elsewhere()) is None
    unwatch()
    assert signal.getsignal(signal.SIGTERM) is before and asyncio.run(elsewhere()) is None


async def _waiting(answer, monkeypatch, grace_s: float):
    """A WaitingResponse run as the server runs it, the gateway told to stop once it is waiting; what it sent
    and whether it gave its job up."""
    import json

    from gateway import waiting

    event = asyncio.Event()
    monkeypatch.setattr(waiting, "stopping", lambda: event)
    monkeypatch.setattr(waiting, "WAIT_GRACE_S", grace_s)
    abandoned: list[bool] = []
    scope, receive, send, sent = client_that_stays()
    task = asyncio.create_task(waiting.WaitingResponse(answer, lambda: abandoned.append(True))(scope, receive, send))
    await asyncio.sleep(0.05)
    event.set()
    await asyncio.wait_for(task, 5)
    body = b"".join(m.get("body", b"") for m in sent)
    return sent[0]["status"], json.loads(body), abandoned


async def test_a_waiting_completion_is_answered_503_when_the_gateway_stops(monkeypatch):
    """Not cut by the server after its grace with a bare 500 while its job runs on for nobody: a JSON 503 that
    says to retry, and the job given up as a client that left gives it up (unless run_to_completion)."""
    async def endless():
        await asyncio.Event().wait()

    status, body, abandoned = await _waiting(endless, monkeypatch, grace_s=0.1)
    assert status == 503 and body["error"]["code"] == body["error"]["type"] == "server_shutting_down"
    assert "Idempotency-Key" in body["error"]["message"] and abandoned == [True]


async def test_a_job_that_ends_within_the_grace_is_answered(monkeypatch):
    from starlette.responses import JSONResponse

    async def soon():
        await asyncio.sleep(0.2)
        return JSONResponse({"ok": True})

    status, body, abandoned = await _waiting(soon, monkeypatch, grace_s=2.0)
    assert (status, body, abandoned) == (200, {"ok": True}, [])
