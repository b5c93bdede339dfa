"""A multipart/form-data upload parsed as it streams in: the `file` part's bytes go to a sink chunk by
chunk (never the whole file in memory), the small text fields are collected."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import ApiError

MAX_FIELD_BYTES = 4096  # purpose and the like
MAX_FIELDS = 16  # besides the file: an upload needs `purpose` (OpenAI's form has two or three fields)


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # of the `file` part, once seen


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


async def stream_form(content_type: str | None, body: AsyncIterator[bytes],
                      on_file: Callable[[bytes], Awaitable[None]], file_field: str = "file") -> Form:
    """Parse the body; each chunk of the `file_field` part is awaited through `on_file` in order."""
    mime, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise ApiError(400, "the upload must be multipart/form-data with a `file` part", param="file")
    form = Form()
    events: list[tuple[str, bytes]] = []
    header: list[bytes] = [b"", b""]
    headers: dict[bytes, bytes] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        headers[header[0].lower()] = header[1]
        header[0], header[1] = b"", b""

    parser = MultipartParser(boundary, {
        "on_part_begin": lambda: (headers.clear(), events.append(("begin", b""))),
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": lambda: events.append(("headers", headers.get(b"content-disposition", b""))),
        "on_part_data": lambda data, start, end: events.append(("data", data[start:end])),
        "on_part_end": lambda: events.append(("end", b"")),
    })
    part = _Part()
    async for chunk in body:
        try:
            parser.write(chunk)
        except FormParserError as e:
            raise ApiError(400, f"the multipart body is malformed: {e}", param="file") from e
        for kind, data in events:
            if kind == "begin":
                part = _Part()
            elif kind == "headers":
                _, disposition = parse_options_header(data)
                part.name = disposition.get(b"name", b"").decode("latin-1")
                raw = disposition.get(b"filename")
                part.filename = raw.decode("utf-8", "replace") if raw is not None else None
                if part.name == file_field:
                    form.filename = part.filename or "upload.jsonl"
            elif kind == "data":
                if part.name == file_field:
                    await on_file(data)
                else:
                    part.data += data
                    if len(part.data) > MAX_FIELD_BYTES:
                        raise ApiError(400, f"{part.name}: longer than {MAX_FIELD_BYTES} bytes", param=part.name)
            elif kind == "end" and part.name != file_field:
                if part.name not in form.fields and len(form.fields) >= MAX_FIELDS:
                    raise ApiError(400, f"the form has more than {MAX_FIELDS} fields besides `{file_field}`",
                                   param=part.name or file_field)
                form.fields[part.name] = part.data.decode("utf-8", "replace")
        events.clear()
    parser.finalize()
    return form
