"""/v1/completions with several prompts (`prompt` a list of texts or of token-id lists), as OpenAI's and
vLLM's take it: one job per prompt, answered as one completion whose choices run prompt by prompt (prompt
i's choice j has index i·n + j) and whose usage is the jobs' sum. A job stays one prompt everywhere else
(the queue, the worker, the job store); only this route's answer joins them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.errors import ApiError
from gateway.schemas import CompletionRequest
from gateway.sse import DONE, KEEPALIVE, data

MAX_PROMPTS = 128  # prompts in one request; each is a job
_END = object()


def split_prompts(body: CompletionRequest) -> list[CompletionRequest] | None:
    """One request per prompt when `prompt` holds several; None when it holds one."""
    prompt = body.prompt
    if not (isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list)):
        return None
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request (got {len(prompt)})",
                       param="prompt")
    return [body.model_copy(update={"prompt": p}) for p in prompt]


def prompt_key(idempotency_key: str | None, index: int) -> str | None:
    """Prompt `index`'s own Idempotency-Key, so that a retry finds each prompt's first job. The first prompt
    keeps the key itself, so that a retry with one prompt where there were several (or back) meets the first
    request's job and is refused as another request. The others are joined by a control character, which no
    header value holds: no key a client sends (`K#1` say) is another request's prompt's."""
    if idempotency_key is None or index == 0:
        return idempotency_key
    return f"{idempotency_key}\x1f{index}"


def sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "prompt_tokens": sum(u["prompt_tokens"] for u in usages),
        "completion_tokens": sum(u["completion_tokens"] for u in usages),
        "total_tokens": sum(u["total_tokens"] for u in usages),
        "prompt_tokens_details": {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                       for u in usages)},
    }


def joined_result(results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One text_completion from each prompt's (in prompt order): the first one's id, every choice
    renumbered, the usage summed."""
    choices = [{**c, "index": i * n + c["index"]} for i, r in enumerate(results) for c in r["choices"]]
    return {**results[0], "choices": choices, "usage": sum_usage([r["usage"] for r in results])}


async def joined_events(streams: list[AsyncIterator[dict[str, Any] | None]], n: int, completion_id: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """One OpenAI stream from each prompt's chunks (gateway/sse.completion_chunks, asked for usage), as
    they come: each chunk under one id with its choice renumbered, the usage summed into the last chunk,
    then [DONE]. A prompt's error event ends the stream, as it ends one prompt's: the other prompts' jobs
    are cancelled, and their errors (jobs of one request often fail alike: one deadline) never sent.
    Closing it closes every prompt's stream (which cancels the unfinished jobs)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[dict[str, Any] | None]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    usage_chunks: list[dict[str, Any]] = []
    try:
        live = len(tasks)
        failed = False
        while live and not failed:
            index, piece = await queue.get()
            if piece is _END:
                live -= 1
            elif piece is None:
                yield KEEPALIVE
            elif "error" in piece:
                yield data(piece)
                failed = True
            elif not piece["choices"]:
                usage_chunks.append(piece)
            else:
                yield data(_renumbered(piece, index * n, completion_id, include_usage))
        if not failed:
            for task in tasks:
                task.result()  # a prompt's stream that raised raises here
            if include_usage and len(usage_chunks) == len(streams):  # every job succeeded
                yield data({**usage_chunks[0], "id": completion_id,
                            "usage": sum_usage([c["usage"] for c in usage_chunks])})
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _renumbered(piece: dict[str, Any], base: int, completion_id: str, include_usage: bool) -> dict[str, Any]:
    out = {**piece, "id": completion_id, "choices": [{**c, "index": base + c["index"]} for c in piece["choices"]]}
    if not include_usage:
        out.pop("usage", None)
    return out


def cancel_all(cancels: list[Callable[[], None] | None]) -> Callable[[], None] | None:
    """One on_abandon for every job that a client leaving should cancel (None: a job it should not);
    None when there are none."""
    cancels = [c for c in cancels if c is not None]
    if not cancels:
        return None

    def cancel() -> None:
        for c in cancels:
            c()
    return cancel
