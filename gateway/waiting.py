"""The answer of a non-streaming completion: the response waits for the job's end itself, listening for
the client's disconnect meanwhile (as the SSE response does), so that a client that goes away cancels its
job instead of leaving it to run for nobody. ASGI gives `receive` only to a response, hence a response.

A gateway told to stop lets it wait WAIT_GRACE_S more; then it answers 503 server_shutting_down (the
error a stream ends with) and gives the job up as a client that left would, rather than be cut by the
server with a bare 500 while its job runs on for nobody."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.access_log import CLIENT_CLOSED
from gateway.errors import error_response, exception_response
from gateway.stopping import STOPPING_MESSAGE, WAIT_GRACE_S, stopping


class WaitingResponse(Response):
    """`answer()` is awaited inside the response; its Response is sent. If the client disconnects first,
    `answer()` is cancelled and `on_abandon` runs."""

    def __init__(self, answer: Callable[[], Awaitable[Response]],
                 on_abandon: Callable[[], None] | None = None) -> None:
        super().__init__(status_code=200)
        self.answer = answer
        self.on_abandon = on_abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        result: Response | None = None
        stopped = False
        try:
            async with anyio.create_task_group() as group:

                async def wait() -> None:
                    nonlocal result
                    try:
                        result = await self.answer()
                    except Exception as e:  # noqa: BLE001 - answered as the routes' errors are
                        result = exception_response(e)
                    group.cancel_scope.cancel()

                async def stop(event: asyncio.Event) -> None:
                    nonlocal stopped
                    await event.wait()
                    await anyio.sleep(WAIT_GRACE_S)
                    stopped = True
                    group.cancel_scope.cancel()

                group.start_soon(wait)
                if (event := stopping()) is not None:
                    group.start_soon(stop, event)
                await _disconnected(receive)
                group.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():  # the server cancelled it: its grace ran out first
            stopped = True
        if result is None:  # the client left, or the gateway stops: nobody will read the job's answer
            if self.on_abandon is not None:
                self.on_abandon()
            if not stopped:
                self.status_code = CLIENT_CLOSED
                return
            result = error_response(503, STOPPING_MESSAGE, type_="server_shutting_down", code="server_shutting_down")
        self.status_code = result.status_code
        await result(scope, receive, send)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
