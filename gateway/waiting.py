"""The answer of a non-streaming completion: the response waits for the job's end itself, listening for
the client's disconnect meanwhile (as the SSE response does), so that a client that goes away cancels its
job instead of leaving it to run for nobody. ASGI gives `receive` only to a response, hence a response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.access_log import CLIENT_CLOSED
from gateway.errors import exception_response


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
        async with anyio.create_task_group() as group:

            async def wait() -> None:
                nonlocal result
                try:
                    result = await self.answer()
                except Exception as e:  # noqa: BLE001 - answered as the routes' errors are
                    result = exception_response(e)
                group.cancel_scope.cancel()

            group.start_soon(wait)
            await _disconnected(receive)
            group.cancel_scope.cancel()
        if result is None:
            self.status_code = CLIENT_CLOSED
            if self.on_abandon is not None:
                self.on_abandon()
            return
        self.status_code = result.status_code
        await result(scope, receive, send)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
