"""Request body size limit, enforced before anything parses JSON."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response

DEFAULT_MAX_BODY_BYTES = 1 << 20
# Routes that stream their body and enforce their own, larger limit (file uploads: batches/settings.py).
STREAMED_PATHS = frozenset({"/v1/files"})


class BodySizeLimitMiddleware:
    """413 when Content-Length or the bytes actually sent pass the limit. The body (small by construction)
    is read here in full and replayed to the app, so the app never sees a partial body."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")
                or scope.get("path") in STREAMED_PATHS):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, receive, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        message = (f"request body is too large: {size} bytes, the limit is {self.max_bytes} bytes"
                   if size else f"request body is larger than the limit of {self.max_bytes} bytes")
        await error_response(413, message, code="request_too_large")(scope, receive, send)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body once, then defers to the real one (disconnects)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
