"""Server-sent events: OpenAI's `data:` chunks for completions, and tokenq's resumable job event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import responses
from gateway.event_hub import Hub
from gateway.jobs import Delta, Final, Restarted, follow, read_job
from gateway.stopping import STOPPING_MESSAGE, stopping
from gateway.tool_stream import ToolStream, call_deltas
from jobstore import JobStore
from protocol import choice_text
from protocol import job_record as F
from protocol.jobs import Choice, JobPayload, JobResult, JobState, TokenLogprob
from tokenq.logs import get_logger

log = get_logger(__name__)

KEEPALIVE_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SSEResponse(StreamingResponse):
    """Streams while listening for the client's disconnect (on every ASGI version), so that the event
    generator is cancelled as soon as the client leaves, not at the next write that fails. When the gateway
    stops (gateway/stopping.py), or its server cancels the stream after its grace, the stream ends with
    `on_stop` (a last event saying why) rather than mid-write."""

    def __init__(self, content: AsyncIterator[str], on_stop: str | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_stop = on_stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        stopped = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(sending)
                    except OSError:
                        pass  # the client went away mid-write
                    group.cancel_scope.cancel()

                async def stop(event: asyncio.Event) -> None:
                    nonlocal stopped
                    await event.wait()
                    stopped = True
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                if (event := stopping()) is not None:
                    group.start_soon(stop, event)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except asyncio.CancelledError:  # the server cancelled it: its grace for open connections ran out
            stopped = True
        if stopped and started:
            log.info("stream closed: the gateway is stopping", path=scope.get("path"))
            with contextlib.suppress(OSError):
                if self.on_stop is not None:
                    await send({"type": "http.response.body", "body": self.on_stop.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 on_stop: str | None = None) -> StreamingResponse:
    return SSEResponse(events, on_stop, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})


KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


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

    def rest(self, result: JobResult, choice: Choice | None = None) -> dict[str, Any] | None:
        entries = responses.logprob_entries(result, choice)[self.sent:]
        self.sent += len(entries)
        return self._format(entries) if entries else None

    def _format(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        if self.kind == "chat":
            return responses.chat_logprobs(entries)
        return self.completion.format(entries)


async def completion_events(redis: aioredis.Redis, payload: JobPayload, created: int, include_usage: bool,
                            on_abandon: Callable[[], None] | None = None,
                            mark: bool = False, hub: Hub | None = None, store: JobStore | None = None
                            ) -> AsyncIterator[str]:
    """OpenAI streaming: chunks of text (with their logprobs when asked), each of one choice (its index), a
    last chunk per choice with its finish_reason, maybe usage, then [DONE]. `on_abandon` is called when the
    stream stops before the job's end (the client disconnected)."""
    async with aclosing(completion_chunks(redis, payload, created, include_usage, on_abandon, mark, hub,
                                          store)) as chunks:
        async for piece in chunks:
            yield KEEPALIVE if piece is None else data(piece)
    yield DONE


async def completion_chunks(redis: aioredis.Redis, payload: JobPayload, created: int, include_usage: bool,
                            on_abandon: Callable[[], None] | None = None,
                            mark: bool = False, hub: Hub | None = None, store: JobStore | None = None
                            ) -> AsyncIterator[dict[str, Any] | None]:
    """The chunks of one job's stream (None where a keep-alive is due). With `include_usage` every chunk
    carries `usage: null` and a last chunk, without choices, the usage, as OpenAI's do. A chat offered
    tools holds back each choice's text that may be a call (gateway/tool_stream.py)."""
    kind, job_id, model = payload.kind, payload.id, payload.model
    n = payload.sampling.n
    logprobs = ([_StreamLogprobs(payload) for _ in range(n)] if payload.sampling.logprobs is not None
                else None)
    tools = ([ToolStream(payload.tools) for _ in range(n)] if payload.tools is not None and kind == "chat"
             else None)
    keepalive = _KeepAlive()
    ended = False
    # Choices already ended by their last delta (one of several, done before the others): OpenAI ends each
    # choice's stream as it finishes. Without tools or logprobs only, whose last chunk needs the result.
    finished: set[int] = set()
    early = tools is None and logprobs is None

    def out(obj: dict[str, Any]) -> dict[str, Any]:
        if include_usage:
            obj["usage"] = None
        return obj

    try:
        if kind == "chat":
            for index in range(n):
                yield out(responses.chunk(kind, job_id, model, created, text="", role=True, index=index))
        # A job submitted for streaming has `streamed` set already; a repeat's first job may not (mark).
        async for item in follow(redis, job_id, [0] * n, want_deltas=True, mark=mark, hub=hub, store=store):
            if isinstance(item, Delta):
                text = item.text
                if tools is not None:
                    text = tools[item.index].feed(text)
                    if tools[item.index].held and logprobs is not None:
                        logprobs[item.index].in_order = False  # text held back: the final chunk carries them
                    if not text:
                        continue
                if text:
                    yield out(responses.chunk(kind, job_id, model, created, text=text, index=item.index,
                                              logprobs=logprobs[item.index].of_delta(item) if logprobs else None))
                if item.finish_reason is not None and early:
                    finished.add(item.index)
                    yield out(responses.chunk(kind, job_id, model, created, text="" if kind != "chat" else None,
                                              index=item.index, finish_reason=item.finish_reason,
                                              stop_reason=item.stop_reason))
            elif isinstance(item, Final):
                ended = True
                if item.state == JobState.succeeded and item.result is not None:
                    for c in item.result.all_choices():
                        if c.index in finished:
                            continue
                        if tools is not None:
                            for piece in _tool_chunks(tools[c.index], c, job_id, model, created):
                                yield out(piece)
                        yield out(responses.chunk(
                            kind, job_id, model, created, text="" if kind != "chat" else None, index=c.index,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                            logprobs=logprobs[c.index].rest(item.result, c) if logprobs else None))
                    if include_usage:
                        yield responses.usage_chunk(kind, job_id, model, created, item.result.usage)
                else:
                    yield {"error": final_error(item)}
                break
            elif isinstance(item, Restarted):
                # What was sent is not the answer, and a stream cannot take it back: an error, as OpenAI and
                # vLLM end a stream whose generation failed; the job is then abandoned as on a disconnect.
                yield {"error": restarted_error(job_id)}
                break
            elif keepalive.due():
                yield None
    finally:
        if not ended and on_abandon is not None:
            on_abandon()


def _tool_chunks(tools: ToolStream, choice: Choice, job_id: str, model: str,
                 created: int) -> list[dict[str, Any]]:
    """What a choice of a chat offered tools sends before its last chunk: the held text as content, or the
    calls."""
    rest = tools.rest(choice)
    if rest:
        return [responses.chunk("chat", job_id, model, created, text=rest, index=choice.index)]
    return [responses.chunk("chat", job_id, model, created, tool_calls=delta, index=choice.index)
            for delta in call_deltas(choice.tool_calls or [])]


# The last event of an OpenAI stream cut by the gateway stopping: the openai client raises it as an APIError.
STOPPING_EVENT = data({"error": {"message": STOPPING_MESSAGE, "type": "server_shutting_down", "param": None,
                                 "code": "server_shutting_down"}})


# The end of a job's event stream cut by the gateway stopping: a comment (readers skip it); the job runs on,
# and its events resume on any gateway with Last-Event-ID.
RESUME_COMMENT = ": the gateway is stopping; follow the job again with Last-Event-ID\n\n"


def restarted_error(job_id: str) -> dict[str, Any]:
    return {"message": f"job {job_id} started again after its worker stopped, and its new attempt wrote other text: "
                       "the text sent so far is not its answer",
            "type": "job_restarted", "param": None, "code": "job_restarted"}


def final_error(final: Final) -> dict[str, Any]:
    """A stream's error event, its `code` the error's type as a response of the same error has it (a client
    that branches on `code`, as the openai client's users do, reads both alike)."""
    if final.error is not None:
        return {"message": final.error.message, "type": final.error.type, "param": None,
                "code": final.error.code or final.error.type}
    return {"message": f"job ended as {final.state.value}", "type": f"job_{final.state.value}",
            "param": None, "code": f"job_{final.state.value}"}


def event_id(offsets: list[int], digests: list[int]) -> str:
    """The SSE id that resumes a job's events (Last-Event-ID): the character offset its text reached and the
    CRC-32 of that text (so that a resumed reader whose job began again with other text meanwhile gets a
    `restart`, not the new text spliced onto the old); for a job of several choices each choice's,
    comma-separated: `128.9f3a2b1c,64.0c1d2e3f`."""
    return ",".join(f"{o}.{d:08x}" for o, d in zip(offsets, digests, strict=True))


def parse_event_id(raw: str) -> list[tuple[int, int | None]] | None:
    """(offset, digest) per choice from a Last-Event-ID (see event_id; a bare offset, as ids were before,
    has no digest: checked_resume settles it); None when it is not one."""
    parsed = []
    for part in raw.split(","):
        offset, dot, digest = part.strip().partition(".")
        try:
            parsed.append((int(offset), int(digest, 16) if dot else None))
        except ValueError:
            return None
    return parsed if all(o >= 0 and (d is None or d < 1 << 32) for o, d in parsed) else None


async def checked_resume(store: JobStore, job_id: str, resume: list[tuple[int, int | None]]
                         ) -> list[tuple[int, int]] | None:
    """`resume` with a digest for every offset; None when the reader must start again. A bare offset (an id
    from before digests) takes the digest of the job's text up to it while the job has had one attempt, whose
    text is the reader's; after another attempt the reader's text is unknown, and resuming could splice two."""
    if all(d is not None or not o for o, d in resume):
        return [(o, d if o else 0) for o, d in resume]
    record = await store.read(job_id)
    if record is None or int(record.get(F.ATTEMPTS) or 0) > 1:
        return None
    texts = _job_texts(record)
    texts += [""] * (len(resume) - len(texts))
    checked = []
    for (offset, digest), text in zip(resume, texts, strict=False):
        if digest is None and offset:
            if len(text) < offset:
                return None
            digest = zlib.crc32(text[:offset].encode())
        checked.append((offset, digest if offset else 0))
    return checked


def _job_texts(record: dict[str, str]) -> list[str]:
    """Each choice's text as far as the job has it: its result's once it has one (a job nobody streamed keeps
    no text of its own), else the text streamed so far."""
    choices = int(record.get(F.CHOICES) or 1)
    if not record.get(F.RESULT):
        return choice_text.split(record.get(F.TEXT, ""), choices)
    texts = [""] * choices
    for c in JobResult.model_validate_json(record[F.RESULT]).all_choices():
        texts[c.index] = c.text
    return texts


def unchecked_error(job_id: str) -> dict[str, Any]:
    return {**restarted_error(job_id),
            "message": f"a Last-Event-ID without a digest cannot be checked against job {job_id}'s text (it ran "
                       "more than once, or its text does not reach that offset): its events start again"}


def restart_event(choices: int, error: dict[str, Any]) -> str:
    """The event that tells a reader to drop its text: the deltas start again at offset 0."""
    body = json.dumps(error, ensure_ascii=False)
    return f"id: {event_id([0] * choices, [0] * choices)}\nevent: restart\ndata: {body}\n\n"


async def job_events(redis: aioredis.Redis, job_id: str, resume: list[tuple[int, int | None]],
                     hub: Hub | None = None, store: JobStore | None = None) -> AsyncIterator[str]:
    """tokenq's job events: `delta` events (with their choice's index) whose id is the offset reached (so
    that Last-Event-ID resumes exactly there), then one final event named after the outcome with the job.
    A `restart` event says the job began again with other text (gateway.jobs.Restarted), or that a reader
    resuming from a bare offset cannot be checked (checked_resume): the reader drops the text it has, and
    the deltas start again at offset 0."""
    keepalive = _KeepAlive()
    store = store or JobStore(redis)
    checked = await checked_resume(store, job_id, resume)
    if checked is None:
        checked = [(0, 0)] * len(resume)
        yield restart_event(len(resume), unchecked_error(job_id))
    offsets = [o for o, _ in checked]
    known = [d for _, d in checked]  # of the reader's text before its offset
    digests = list(known)  # of the text given up to each offset
    while True:
        async for item in follow(redis, job_id, offsets, want_deltas=True, hub=hub, store=store, digests=known):
            if isinstance(item, Delta):
                grow = item.index + 1 - len(offsets)
                offsets += [0] * grow
                digests += [0] * grow
                offsets[item.index] = item.end
                digests[item.index] = zlib.crc32(item.text.encode(), digests[item.index])
                fields = {"text": item.text, "offset": item.offset, "index": item.index}
                if item.finish_reason is not None:  # this choice ended, the job's others go on
                    fields["finish_reason"] = item.finish_reason
                body = json.dumps(fields, ensure_ascii=False)
                yield f"id: {event_id(offsets, digests)}\nevent: delta\ndata: {body}\n\n"
            elif isinstance(item, Final):
                record = await read_job(store, job_id)
                job = responses.job_object(job_id, record) if record else {"id": job_id, "status": item.state.value}
                name = "done" if item.state == JobState.succeeded else item.state.value
                yield f"id: {event_id(offsets, digests)}\nevent: {name}\ndata: {json.dumps(job, ensure_ascii=False)}\n\n"
                return
            elif isinstance(item, Restarted):
                offsets, digests, known = [0] * len(offsets), [0] * len(offsets), [0] * len(offsets)
                yield restart_event(len(offsets), restarted_error(job_id))
                break
            elif keepalive.due():
                yield KEEPALIVE
