"""OpenAI response objects (chat.completion, text_completion, their stream chunks) and tokenq's job object,
built from protocol results and job hashes."""

from __future__ import annotations

import codecs
import json
from typing import Any

from protocol import job_record as F
from protocol.jobs import Choice, JobError, JobKind, JobPayload, JobResult, TokenLogprob, Usage
from protocol.token_bytes import token_bytes
from protocol.urlguard import ALLOW_ENV


def completion_id(kind: JobKind, job_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id.removeprefix("job_")


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _token_bytes(token: str) -> list[int]:
    return list(token_bytes(token))


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": _token_bytes(lp.token),
         "top_logprobs": [{"token": t, "logprob": p, "bytes": _token_bytes(t)} for _, t, p in lp.top]}
        for lp in logprobs
    ]}


class CompletionLogprobs:
    """/v1/completions' `logprobs` object, entry by entry in order (a stream hands them over in pieces).

    With echo the entries are the prompt's tokens, then the generated ones: prompt offsets count from the
    start of the text, generated ones from the end of the echoed prompt, as OpenAI's and vLLM's do; the
    prompt's first token has no logprob (null) and no alternatives (null). An offset counts the characters
    of the text before the token, so a token holding part of a character's bytes starts where the
    character does."""

    def __init__(self, echo_chars: int = 0, prompt_entries: int = 0) -> None:
        self._prompt_left = prompt_entries
        self._prompt = _TextOffsets(0)
        self._output = _TextOffsets(echo_chars)

    def format(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for lp in entries:
            if self._prompt_left > 0:
                self._prompt_left -= 1
                offsets.append(self._prompt.advance(lp.token))
            else:
                offsets.append(self._output.advance(lp.token))
        return {
            "tokens": [lp.token for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            # The sampled token is always among them (OpenAI: "up to logprobs + 1 elements").
            "top_logprobs": [None if lp.logprob is None else {t: p for _, t, p in lp.top} | {lp.token: lp.logprob}
                             for lp in entries],
            "text_offset": offsets,
        }


class _TextOffsets:
    """Characters of text so far, fed one token's bytes at a time."""

    def __init__(self, start: int) -> None:
        self._at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token: str) -> int:
        at = self._at
        self._at += len(self._decoder.decode(token_bytes(token)))
        return at


def logprob_entries(result: JobResult, choice: Choice | None = None) -> list[TokenLogprob]:
    """Every entry a completion's `logprobs` covers: the echoed prompt's (when computed), then the output's
    (of `choice`, the first by default)."""
    logprobs = result.logprobs if choice is None else choice.logprobs
    return [*(result.prompt_logprobs or ()), *(logprobs or ())]


def echo_chars(payload: JobPayload) -> int:
    return len(payload.echo_prompt) if payload.echo_prompt is not None else 0


def completion_logprobs_of(result: JobResult, echo_chars: int, choice: Choice | None = None) -> dict[str, Any]:
    prompt = len(result.prompt_logprobs or ())
    return CompletionLogprobs(echo_chars, prompt).format(logprob_entries(result, choice))


def chat_message(choice: Choice) -> dict[str, Any]:
    """A choice's assistant message: its text, or the calls it made and the text before them."""
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text}
    return {"role": "assistant", "content": choice.content,
            "tool_calls": [c.model_dump() for c in choice.tool_calls]}


def result_object(kind: JobKind, job_id: str, model: str, created: int, result: JobResult,
                  want_logprobs: bool, echo_chars: int = 0) -> dict[str, Any]:
    """The non-streaming OpenAI answer for a finished job, every choice of it; `echo_chars`: the echoed
    prompt's length."""
    choices = [_choice(kind, result, c, want_logprobs, echo_chars) for c in result.all_choices()]
    return {"id": completion_id(kind, job_id), "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": choices, "usage": usage_json(result.usage)}


def _choice(kind: JobKind, result: JobResult, c: Choice, want_logprobs: bool, echo_chars: int) -> dict[str, Any]:
    if kind == "chat":
        return {
            "index": c.index,
            "message": chat_message(c),
            "logprobs": chat_logprobs(c.logprobs) if want_logprobs and c.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
    return {
        "index": c.index,
        "text": c.text,
        "logprobs": (completion_logprobs_of(result, echo_chars, c)
                     if want_logprobs and logprob_entries(result, c) else None),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def chunk(kind: JobKind, job_id: str, model: str, created: int, text: str | None = None,
          finish_reason: str | None = None, role: bool = False,
          logprobs: dict[str, Any] | None = None, index: int = 0,
          stop_reason: str | int | None = None,
          tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One streaming chunk with a single choice; `logprobs` already in the route's shape, `tool_calls`
    (chat) the delta's call fragments. The chunk that ends a choice (finish_reason set) carries its
    stop_reason too."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return {"id": completion_id(kind, job_id), "object": obj, "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(kind: JobKind, job_id: str, model: str, created: int, usage: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": completion_id(kind, job_id), "object": obj, "created": created, "model": model,
            "choices": [], "usage": usage_json(usage)}


def _time(value: str | None) -> int | None:
    return int(float(value)) if value else None


def job_object(job_id: str, record: dict[str, str]) -> dict[str, Any]:
    """GET /v1/jobs/{id}: the job's state and, once final, its result or error."""
    payload = JobPayload.model_validate_json(record[F.PAYLOAD]) if record.get(F.PAYLOAD) else None
    created = _time(record.get(F.CREATED_AT)) or 0
    model = record.get(F.MODEL, payload.model if payload else "")
    result = None
    if record.get(F.RESULT) and payload is not None:
        result = result_object(payload.kind, job_id, model, created, JobResult.model_validate_json(record[F.RESULT]),
                               want_logprobs=payload.sampling.logprobs is not None,
                               echo_chars=echo_chars(payload))
    error = JobError.model_validate_json(record[F.ERROR]).model_dump() if record.get(F.ERROR) else None
    return {
        "id": job_id,
        "object": "job",
        "status": record.get(F.STATE, "queued"),
        "model": model,
        "kind": payload.kind if payload else None,
        "priority": record.get(F.LANE),
        "created_at": created,
        "started_at": _time(record.get(F.STARTED_AT)),
        "finished_at": _time(record.get(F.FINISHED_AT)),
        "attempts": int(record.get(F.ATTEMPTS) or 0),
        "metadata": json.loads(record[F.METADATA]) if record.get(F.METADATA) else {},
        "result": result,
        "error": error,
        "cache": record.get(F.CACHE),
        "cache_entry": record.get(F.CACHE_ENTRY),
        "webhook": webhook_object(record),
    }


# What a client sees of a refused delivery instead of the recorded error, which names the private address the
# host resolved to: a client must not learn from tokenq what names inside its network resolve to.
REFUSED_FOR_CLIENTS = ("the host resolves to a non-public address, where tokenq does not deliver (an operator "
                       f"may allow it: {ALLOW_ENV})")


def webhook_object(record: dict[str, str]) -> dict[str, Any] | None:
    """Where the job's final state goes and how each delivery attempt went (None without a webhook_url):
    `state` is the last attempt's outcome, `pending` before the first."""
    url = record.get(F.WEBHOOK_URL)
    if not url:
        return None
    attempts = [{**a, "error": REFUSED_FOR_CLIENTS} if a.get("outcome") == "refused" else a
                for a in F.webhook_attempts(record)]
    return {"url": url, "state": attempts[-1]["outcome"] if attempts else "pending", "attempts": attempts}


def list_page(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor page (files, batches): the objects, the first and last ids, whether more follow."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
