"""Files in Redis: an upload is validated and written line by line as it streams in (never whole in
memory); content streams out in chunks. Redis is the store so that every gateway, feeder and host reads
the same files with nothing more to set up; each file expires after the retention period and counts
against its tenant's quota until then."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import redis.asyncio as aioredis

from batches import keys as K
from batches.lines import LineError, LineSplitter, line_text, parse_line
from batches.pages import read_page
from batches.settings import BatchSettings
from gateway.errors import ApiError

FLUSH_LINES = 1000  # lines written to Redis per command
FLUSH_BYTES = 1 << 20
UPLOAD_TTL_S = 3600  # an upload cut off half way leaves nothing behind for longer than this
RESERVATION_TTL_S = 60  # a gateway that dies while committing an upload holds its bytes no longer than this
READ_LINES = 1000  # lines read back per command
PURPOSES = ("batch", "batch_output")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def file_object(meta: dict[str, str]) -> dict[str, Any]:
    """OpenAI's FileObject."""
    return {"id": meta["id"], "object": "file", "bytes": int(meta["bytes"]),
            "created_at": int(float(meta["created_at"])), "expires_at": int(float(meta["expires_at"])),
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed",
            "status_details": None}


class LineWriter:
    """Writes lines of one new file to Redis in chunks; `commit` makes the file visible."""

    def __init__(self, redis: aioredis.Redis, settings: BatchSettings, file_id: str) -> None:
        self.redis = redis
        self.settings = settings
        self.file_id = file_id
        self.lines = 0
        self.bytes = 0
        self._buf: dict[int, bytes] = {}
        self._buf_bytes = 0

    async def add(self, line: bytes | str) -> None:
        data = line.encode() if isinstance(line, str) else line
        self._buf[self.lines] = data
        self.lines += 1
        self.bytes += len(data) + 1
        self._buf_bytes += len(data)
        if len(self._buf) >= FLUSH_LINES or self._buf_bytes >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self._buf:
            return
        key = K.file_lines_key(self.file_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=self._buf)
            pipe.expire(key, UPLOAD_TTL_S)
            await pipe.execute()
        self._buf, self._buf_bytes = {}, 0

    async def commit(self, tenant: str, filename: str, purpose: str, extra: dict[str, str] | None = None,
                     size: int | None = None) -> dict[str, str]:
        """Write the file's object and give every key the retention period; returns the object's fields."""
        await self.flush()
        now = time.time()
        meta = {"id": self.file_id, "tenant": tenant, "filename": filename, "purpose": purpose,
                "bytes": str(self.bytes if size is None else size), "lines": str(self.lines),
                "created_at": repr(now), "expires_at": repr(now + self.settings.file_retention_s), **(extra or {})}
        ttl = self.settings.file_retention_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(K.file_key(self.file_id), mapping=meta)
            pipe.expire(K.file_key(self.file_id), ttl)
            if self.lines:
                pipe.expire(K.file_lines_key(self.file_id), ttl)
            pipe.zadd(K.tenant_files_key(tenant), {self.file_id: now})
            await pipe.execute()
        return meta

    async def discard(self) -> None:
        await self.redis.delete(K.file_lines_key(self.file_id))


class BatchFileUpload:
    """One `purpose=batch` upload: each line is checked as it arrives (a bad one ends the upload with its
    number), duplicates of a custom_id are refused, and the limits are OpenAI's."""

    def __init__(self, redis: aioredis.Redis, settings: BatchSettings, tenant: str) -> None:
        self.settings = settings
        self.tenant = tenant
        self.writer = LineWriter(redis, settings, new_file_id())
        self.splitter = LineSplitter(settings.max_line_bytes)
        self.size = 0
        self._custom_ids: set[str] = set()  # bounded by max_lines
        self._urls: dict[str, int] = {}  # endpoint -> first line using it
        self._used_at_start = 0

    async def start(self, redis: aioredis.Redis) -> None:
        """Reads what the tenant's files hold, so that an upload past its quota stops as it streams in rather
        than after all its lines are written."""
        self._used_at_start = await tenant_usage(redis, self.tenant)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        self._check_quota(self._used_at_start + self.size)
        if self.size > self.settings.max_file_bytes:
            raise ApiError(413, f"file: larger than the limit of {self.settings.max_file_bytes} bytes",
                           param="file", code="file_too_large")
        try:
            for number, line in self.splitter.feed(data):
                await self._line(number, line)
        except LineError as e:
            raise _bad_line(e) from e

    async def _line(self, number: int, line: bytes) -> None:
        text = line_text(line, number)
        parsed = parse_line(text, number)
        if parsed.custom_id in self._custom_ids:
            raise LineError(number, f"custom_id {parsed.custom_id!r} is used by an earlier line; each line "
                                    "needs its own")
        if self.writer.lines >= self.settings.max_lines:
            raise LineError(number, f"a batch file holds at most {self.settings.max_lines} requests")
        self._custom_ids.add(parsed.custom_id)
        self._urls.setdefault(parsed.url, number)
        await self.writer.add(text)

    async def finish(self, filename: str, redis: aioredis.Redis) -> dict[str, str]:
        try:
            for number, line in self.splitter.close():
                await self._line(number, line)
        except LineError as e:
            raise _bad_line(e) from e
        if self.writer.lines == 0:
            raise ApiError(400, "file: has no requests (one JSON object per line)", param="file",
                           code="empty_file")
        # The quota holds however many uploads finish at once: each reserves its bytes (one INCRBY, atomic on
        # any Redis) before it reads what the tenant's files hold, and counts every reservation made before its
        # own. An upload committed meanwhile may count twice (a refusal to retry), never none.
        reserved_key = K.tenant_reserved_key(self.tenant)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.incrby(reserved_key, self.size)
            pipe.expire(reserved_key, RESERVATION_TTL_S)
            reserved, _ = await pipe.execute()
        try:
            held = await tenant_usage(redis, self.tenant) + int(reserved)
            self._check_quota(held)
            return await self.writer.commit(self.tenant, filename, "batch", {"urls": json.dumps(self._urls)},
                                            size=self.size)
        finally:
            await redis.decrby(reserved_key, self.size)

    def _check_quota(self, held: int) -> None:
        if held > self.settings.tenant_quota_bytes:
            raise ApiError(400, f"file: tenant {self.tenant!r} would hold {held} bytes of files, over its quota "
                                f"of {self.settings.tenant_quota_bytes}; delete some files", param="file",
                           code="quota_exceeded")


def _bad_line(e: LineError) -> ApiError:
    return ApiError(400, f"file: {e}", param="file", code="invalid_batch_line")


async def tenant_usage(redis: aioredis.Redis, tenant: str) -> int:
    """Bytes of the tenant's files that still exist; ids of expired ones are dropped from its index."""
    ids = await redis.zrange(K.tenant_files_key(tenant), 0, -1)
    if not ids:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for file_id in ids:
            pipe.hget(K.file_key(file_id), "bytes")
        sizes = await pipe.execute()
    gone = [i for i, size in zip(ids, sizes, strict=True) if size is None]
    if gone:
        await redis.zrem(K.tenant_files_key(tenant), *gone)
    return sum(int(s) for s in sizes if s is not None)


async def read_file(redis: aioredis.Redis, file_id: str, tenant: str) -> dict[str, str]:
    """The file's fields when it exists and is the tenant's; else 404 (another tenant's ids are not
    confirmed to exist)."""
    meta = await redis.hgetall(K.file_key(file_id))
    if not meta or meta.get("tenant") != tenant:
        raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return meta


async def read_lines(redis: aioredis.Redis, file_id: str, indices: Iterable[int]) -> list[str | None]:
    wanted = list(indices)
    if not wanted:
        return []
    return await redis.hmget(K.file_lines_key(file_id), wanted)


async def iter_content(redis: aioredis.Redis, file_id: str, lines: int) -> AsyncIterator[bytes]:
    """The file as JSONL, READ_LINES at a time."""
    for start in range(0, lines, READ_LINES):
        chunk = await read_lines(redis, file_id, range(start, min(lines, start + READ_LINES)))
        yield "".join(line + "\n" for line in chunk if line is not None).encode()


async def delete_file(redis: aioredis.Redis, meta: dict[str, str]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(K.file_key(meta["id"]), K.file_lines_key(meta["id"]))
        pipe.zrem(K.tenant_files_key(meta["tenant"]), meta["id"])
        await pipe.execute()


async def list_files(redis: aioredis.Redis, tenant: str, purpose: str | None, limit: int, order: str,
                     after: str | None) -> tuple[list[dict[str, str]], bool]:
    """A page of the tenant's files (newest first unless order='asc') and whether more follow."""
    index = K.tenant_files_key(tenant)
    ids = await (redis.zrange(index, 0, -1) if order == "asc" else redis.zrevrange(index, 0, -1))
    page, more, _ = await read_page(redis, ids, after, K.file_key, limit,
                                    keep=lambda meta: purpose is None or meta.get("purpose") == purpose)
    return page, more
