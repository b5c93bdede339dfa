"""One line of a batch input file: `{"custom_id", "method", "url", "body"}`, checked as the route of its
`url` would check the body. Errors name the line's number (from 1), as OpenAI's do."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError, describe_validation_error
from gateway.prepare import check_model_free
from gateway.prompt_list import split_prompts
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from protocol.json_text import parse_json
from protocol.text import encodable_json

ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
MAX_CUSTOM_ID_CHARS = 512
BOM = "\ufeff"


class LineError(ValueError):
    """A bad line; the message starts with its number."""

    def __init__(self, number: int, message: str) -> None:
        super().__init__(f"line {number}: {message}")
        self.number = number


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    url: str
    body: dict[str, Any]  # as the client wrote it (the output's copy of a line keys on it)

    def request(self) -> ChatCompletionRequest | CompletionRequest:
        """The body as the route's request model (already checked by parse_line)."""
        return ENDPOINTS[self.url].model_validate(self.body)

    def prompt_key(self) -> str:
        """Sorts lines so that those sharing a prompt prefix are fed next to each other."""
        prompt = self.body.get("messages", self.body.get("prompt"))
        return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)

    def dedup_digest(self) -> str | None:
        """Identical deterministic requests (greedy, or a fixed seed) give identical answers: one digest."""
        if self.body.get("temperature") != 0 and self.body.get("seed") is None:
            return None
        canonical = json.dumps([self.url, self.body], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def without_bom(text: str) -> str:
    """The line without the byte order mark some editors put first: no part of its JSON. The upload drops it,
    and every read of a stored line does too (a file stored with one keeps it on its first line)."""
    return text.removeprefix(BOM)


def line_text(raw: bytes, number: int) -> str:
    """The line as text: UTF-8, without a byte order mark (without_bom)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(number, f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save the file "
                                "as UTF-8") from e
    return without_bom(text)


def parse_line(text: str, number: int) -> BatchLine:
    """The line checked in full (envelope and body), or LineError. The body obeys the rules of its route
    that hold whatever the model (`check_model_free`); the model's own (context, vocabulary) wait until
    the line is fed."""
    try:
        raw = parse_json(without_bom(text))
    except ValueError as e:
        raise LineError(number, f"not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise LineError(number, "must be a JSON object with custom_id, method, url and body")
    try:
        env = _Envelope.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        message, param = describe_validation_error(err)
        if param is None and err.get("loc"):  # the line's own `body`, which field_path drops as FastAPI's
            message = f"{'.'.join(map(str, err['loc']))}: {message}"
        raise LineError(number, message) from e
    try:
        request = ENDPOINTS[env.url].model_validate(env.body)
        encodable_json(env.body)  # the fields the route ignores too: the body is kept as written, and hashed
    except ValidationError as e:
        message, _ = describe_validation_error(e.errors()[0])
        raise LineError(number, f"body.{message}") from e
    except ValueError as e:
        raise LineError(number, f"body: {e}") from e
    if request.stream:
        raise LineError(number, "body.stream: a batch request cannot stream (got true)")
    if isinstance(request, CompletionRequest) and split_prompts(request) is not None:
        raise LineError(number, f"body.prompt: a batch line takes one prompt (got {len(request.prompt)}); "
                                "write one line per prompt")
    try:
        check_model_free(request)
    except ApiError as e:
        raise LineError(number, f"body.{e.message}") from e
    return BatchLine(env.custom_id, env.url, env.body)


class LineSplitter:
    """Bytes in any chunking -> whole lines (without the newline), never holding more than one line."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.number = 0  # lines seen, blank ones included: error messages count as an editor does
        self._pending = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """(line number, line) for each line completed by `data`; blank lines are skipped."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._pending += data[start:]
                if len(self._pending) > self.max_line_bytes:
                    raise LineError(self.number + 1, f"longer than the limit of {self.max_line_bytes} bytes")
                return
            self._pending += data[start:end]
            start = end + 1
            yield from self._line()

    def close(self) -> Iterator[tuple[int, bytes]]:
        """The last line, when the data did not end with a newline."""
        if self._pending:
            yield from self._line()

    def _line(self) -> Iterator[tuple[int, bytes]]:
        self.number += 1
        line = bytes(self._pending).rstrip(b"\r")
        self._pending.clear()
        if len(line) > self.max_line_bytes:
            raise LineError(self.number, f"longer than the limit of {self.max_line_bytes} bytes")
        if line.strip():
            yield self.number, line
