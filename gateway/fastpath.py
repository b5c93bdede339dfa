"""The submitting routes ahead of FastAPI: POST /v1/jobs, /v1/completions and /v1/chat/completions.
/v1/jobs takes the load (thousands of submissions a second on a small machine), and the OpenAI routes sit on
every streamed request's time to first token; FastAPI's middleware, routing, dependency solving and body
handling cost more CPU than the submission itself. Here: the same body limit
(413), the same auth (401), the body parsed by the same pydantic model, the same enqueue and the same
answers, errors included (errors.exception_response); the OpenAI routes answer with the very response
object their FastAPI route builds (routes_openai.answer). A body that is not JSON or does not validate goes
on to FastAPI with its bytes replayed, so those 400s, and their order against the 401, are FastAPI's own.
The routes stay declared in routes_jobs.py and routes_openai.py (OpenAPI documents them; they answer what
comes through to them)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import routes_openai
from gateway.access_log import CLIENT_CLOSED
from gateway.admission import idempotency_key_of
from gateway.context import GatewayContext
from gateway.enqueue import enqueue, job_created_body
from gateway.errors import error_response, exception_response
from gateway.limits import replaying
from gateway.metrics import GatewayMetrics
from gateway.schemas import ChatCompletionRequest, CompletionRequest, JobCreate
from gateway.waiting import WaitingResponse

JOBS_PATH = "/v1/jobs"
SCHEMAS: dict[str, type[BaseModel]] = {JOBS_PATH: JobCreate, "/v1/completions": CompletionRequest,
                                       "/v1/chat/completions": ChatCompletionRequest}
_JSON = b"application/json"


def is_fast_submission(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in SCHEMAS


class FastSubmit:
    """The ASGI handler of the submitting routes; `fallback` is the FastAPI app itself (for what it passes
    on)."""

    def __init__(self, fallback: ASGIApp, ctx: Callable[[], GatewayContext], metrics: GatewayMetrics,
                 max_body_bytes: int) -> None:
        self.fallback = fallback
        self.ctx = ctx
        self.max_body_bytes = max_body_bytes
        self._latency: dict[str, Histogram] = {path: metrics.latency.labels("POST", path) for path in SCHEMAS}
        self._requests = metrics.requests
        self._counters: dict[tuple[str, int], Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # a request whose handling raised counts as MetricsMiddleware counts it
        path = scope["path"]
        try:
            status = await self._handle(scope, receive, send, start)
        finally:
            if status:  # 0: passed on to FastAPI, whose MetricsMiddleware counted it
                counter = self._counters.get((path, status))
                if counter is None:
                    counter = self._counters[path, status] = self._requests.labels("POST", path, str(status))
                counter.inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send, start: float) -> int:
        length = content_type = authorization = None
        idempotency_keys: list[bytes] = []  # every one: admission refuses two
        for name, value in scope["headers"]:  # the first of repeated headers, as Starlette's Headers.get
            if name == b"content-length":
                length = value if length is None else length
            elif name == b"content-type":
                content_type = value if content_type is None else content_type
            elif name == b"authorization":
                authorization = value if authorization is None else authorization
            elif name == b"idempotency-key":
                idempotency_keys.append(value)
        body = await self._read_body(length, receive)
        if body is None:  # the client left: counted as MetricsMiddleware counts it
            return CLIENT_CLOSED
        if isinstance(body, Response):
            return await self._answer(body, scope, receive, send, start)
        if content_type is not None and content_type.partition(b";")[0].strip().lower() != _JSON:
            return await self._pass_on(body, scope, receive, send)
        path = scope["path"]
        try:
            request = SCHEMAS[path].model_validate_json(body)
        except ValidationError:
            return await self._pass_on(body, scope, receive, send)
        try:
            ctx = self.ctx()
            tenant = await ctx.auth.authenticate(authorization.decode("latin-1") if authorization else None)
            key = idempotency_key_of([k.decode("latin-1") for k in idempotency_keys])
            if not isinstance(request, JobCreate):  # an OpenAI route: its own response (a stream, or JSON)
                response = await routes_openai.answer(ctx, tenant, request, key)  # type: ignore[arg-type]
                return await self._answer(response, scope, receive, send, start)
            job = request
            enqueued = await enqueue(ctx, tenant, job, job.priority, job.stream, job.metadata, key)
            content = json.dumps(job_created_body(enqueued, job.metadata), ensure_ascii=False, allow_nan=False,
                                 separators=(",", ":")).encode()  # as Starlette's JSONResponse renders it
        except Exception as e:  # noqa: BLE001 - answered as FastAPI's exception handlers answer it
            return await self._answer(exception_response(e), scope, receive, send, start)
        headers = [(b"idempotent-replayed", b"true")] if enqueued.repeat else []
        headers += [(name.encode(), value.encode()) for name, value in enqueued.cache_headers.items()]
        headers += [(b"content-length", str(len(content)).encode()), (b"content-type", _JSON)]
        self._latency[JOBS_PATH].observe(time.perf_counter() - start)
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return 202

    async def _read_body(self, length: bytes | None, receive: Receive) -> bytes | Response | None:
        """The whole body; a 413 past the limit (declared or sent), as limits.BodySizeLimitMiddleware
        answers it; None when the client left."""
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_body_bytes:
            return self._too_large(declared)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, size: int) -> Response:
        return error_response(413, f"request body is too large: {size} bytes, the limit is "
                                   f"{self.max_body_bytes} bytes", code="request_too_large")

    async def _answer(self, response: Response, scope: Scope, receive: Receive, send: Send,
                      start: float) -> int:
        """Latency as MetricsMiddleware takes it: to the answer's start (a waiting completion answers at
        the job's end)."""
        waits = isinstance(response, WaitingResponse)
        if not waits:
            self._latency[scope["path"]].observe(time.perf_counter() - start)
        await response(scope, receive, send)
        if waits:
            self._latency[scope["path"]].observe(time.perf_counter() - start)
        return response.status_code

    async def _pass_on(self, body: bytes, scope: Scope, receive: Receive, send: Send) -> int:
        await self.fallback(scope, replaying(body, receive), send)
        return 0
