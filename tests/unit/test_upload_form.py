"""gateway/upload.py: a multipart upload streams its file and keeps a bounded few small fields."""

from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.upload import MAX_FIELDS, stream_form

BOUNDARY = "b0undary"


def _form(fields: list[tuple[str, str]], file: bytes) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode() for n, v in fields]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                 f"Content-Type: application/jsonl\r\n\r\n".encode() + file + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def _parse(body: bytes) -> tuple[dict[str, str], bytes]:
    got = bytearray()

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    async def sink(data: bytes) -> None:
        got.extend(data)

    form = await stream_form(f"multipart/form-data; boundary={BOUNDARY}", chunks(), sink)
    return form.fields, bytes(got)


async def test_the_file_streams_and_the_fields_are_kept():
    fields, file = await _parse(_form([("purpose", "batch")], b'{"a": 1}\n' * 500))
    assert fields == {"purpose": "batch"} and file == b'{"a": 1}\n' * 500


async def test_a_form_of_endless_fields_is_refused_before_it_fills_memory():
    """Each field is small, but a client could send millions of them (the upload route has no body limit)."""
    many = [(f"f{i}", "x" * 100) for i in range(MAX_FIELDS + 1)]
    with pytest.raises(ApiError) as e:
        await _parse(_form(many, b"{}\n"))
    assert e.value.status == 400 and f"more than {MAX_FIELDS} fields" in str(e.value)
    fields, _ = await _parse(_form(many[:MAX_FIELDS], b"{}\n"))
    assert len(fields) == MAX_FIELDS
