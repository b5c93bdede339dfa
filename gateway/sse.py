"""Server-sent events: OpenAI's `data:` chunks for completions, and tokenq's resumable job event stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import responses
from gateway.event_hub import Hub
from gateway.jobs import Delta, Final, follow, read_job
from gateway.tool_stream import ToolStream, call_deltas
from protocol.jobs import JobPayload, JobResult, JobState, TokenLogprob

KEEPALIVE_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SSEResponse(StreamingResponse):
    """Streams while listening for the client's disconnect (on every ASGI version), so that the event
    generator is cancelled as soon as the client leaves, not at the next write that fails."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return SSEResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})


def data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _KeepAlive:
    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= KEEPALIVE_S:
            self.last = now
            return True
        return False


class _StreamLogprobs:
    """The logprobs of a stream's chunks. Each delta from the publisher carries the entries that follow
    the ones before it; a text that came without them (from the hash, after a missed message) stops that,
    and the final chunk then carries every entry not sent yet, from the result. In order, none twice."""

    def __init__(self, payload: JobPayload) -> None:
        self.kind = payload.kind
        self.sent = 0
        self.in_order = True
        prompt = len(payload.prompt_token_ids) if payload.sampling.prompt_logprobs is not None else 0
        self.completion = responses.CompletionLogprobs(responses.echo_chars(payload), prompt)

    def of_delta(self, delta: Delta) -> dict[str, Any] | None:
        if delta.logprobs is None:
            self.in_order = False
        if not self.in_order or not delta.logprobs:
            return None
        self.sent += len(delta.logprobs)
        return self._format(delta.logprobs)

    def rest(self, result: JobResult) -> dict[str, Any] | None:
        entries = responses.logprob_entries(result)[self.sent:]
        self.sent += len(entries)
        return self._format(entries) if entries else None

    def _format(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        if self.kind == "chat":
            return responses.chat_logprobs(entries)
        return self.completion.format(entries)


async def completion_events(redis: aioredis.Redis, payload: JobPayload, created: int, include_usage: bool,
                            on_abandon: Callable[[], None] | None = None,
                            mark: bool = False, hub: Hub | None = None) -> AsyncIterator[str]:
    """OpenAI streaming: chunks of text (with their logprobs when asked), a last chunk with finish_reason,
    maybe usage, then [DONE]. `on_abandon` is called when the stream stops before the job's end (the
    client disconnected)."""
    kind, job_id, model = payload.kind, payload.id, payload.model
    logprobs = _StreamLogprobs(payload) if payload.sampling.logprobs is not None else None
    tools = ToolStream(payload.tools) if payload.tools is not None and kind == "chat" else None
    keepalive = _KeepAlive()
    ended = False
    try:
        if kind == "chat":
            yield data(responses.chunk(kind, job_id, model, created, text="", role=True))
        # A job submitted for streaming has `streamed` set already; a repeat's first job may not (mark).
        async for item in follow(redis, job_id, 0, want_deltas=True, mark=mark, hub=hub):
            if isinstance(item, Delta):
                text = item.text
                if tools is not None:
                    text = tools.feed(text)
                    if tools.held and logprobs is not None:
                        logprobs.in_order = False  # text held back: the final chunk carries the logprobs
                    if not text:
                        continue
                yield data(responses.chunk(kind, job_id, model, created, text=text,
                                           logprobs=logprobs.of_delta(item) if logprobs else None))
            elif isinstance(item, Final):
                ended = True
                if item.state == JobState.succeeded and item.result is not None:
                    if tools is not None:
                        for piece in _tool_chunks(tools, item.result, job_id, model, created):
                            yield data(piece)
                    yield data(responses.chunk(kind, job_id, model, created,
                                               text="" if kind != "chat" else None,
                                               finish_reason=item.result.finish_reason,
                                               logprobs=logprobs.rest(item.result) if logprobs else None))
                    if include_usage:
                        yield data(responses.usage_chunk(kind, job_id, model, created, item.result.usage))
                else:
                    yield data({"error": final_error(item)})
                break
            elif keepalive.due():
                yield ": keep-alive\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not ended and on_abandon is not None:
            on_abandon()


def _tool_chunks(tools: ToolStream, result: JobResult, job_id: str, model: str,
                 created: int) -> list[dict[str, Any]]:
    """What a chat offered tools sends before its last chunk: the held text as content, or the calls."""
    rest = tools.rest(result)
    if rest:
        return [responses.chunk("chat", job_id, model, created, text=rest)]
    return [responses.chunk("chat", job_id, model, created, tool_calls=delta)
            for delta in call_deltas(result.tool_calls or [])]


def final_error(final: Final) -> dict[str, Any]:
    if final.error is not None:
        return {"message": final.error.message, "type": final.error.type, "param": None, "code": None}
    return {"message": f"job ended as {final.state.value}", "type": f"job_{final.state.value}",
            "param": None, "code": None}


async def job_events(redis: aioredis.Redis, job_id: str, offset: int,
                     hub: Hub | None = None) -> AsyncIterator[str]:
    """tokenq's job events: `delta` events whose id is the character offset at their end (so that
    Last-Event-ID resumes exactly there), then one final event named after the outcome with the job."""
    keepalive = _KeepAlive()
    async for item in follow(redis, job_id, offset, want_deltas=True, hub=hub):
        if isinstance(item, Delta):
            offset = item.end
            body = json.dumps({"text": item.text, "offset": item.offset}, ensure_ascii=False)
            yield f"id: {item.end}\nevent: delta\ndata: {body}\n\n"
        elif isinstance(item, Final):
            record = await read_job(redis, job_id)
            job = responses.job_object(job_id, record) if record else {"id": job_id, "status": item.state.value}
            name = "done" if item.state == JobState.succeeded else item.state.value
            yield f"id: {offset}\nevent: {name}\ndata: {json.dumps(job, ensure_ascii=False)}\n\n"
            return
        elif keepalive.due():
            yield ": keep-alive\n\n"
