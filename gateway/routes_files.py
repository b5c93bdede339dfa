"""OpenAI's Files API for batch input and output: POST/GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content. Files belong to the caller's tenant."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from batches.files import (
    PURPOSES,
    BatchFileUpload,
    delete_file,
    file_object,
    iter_content,
    list_files,
    read_file,
)
from batches.settings import BatchSettings
from batches.store import batches_reading
from gateway.context import Caller, get_caller, single_node_only
from gateway.errors import ApiError
from gateway.responses import list_page
from gateway.upload import stream_form

router = APIRouter(dependencies=[Depends(single_node_only)])


def batch_settings(request: Request) -> BatchSettings:
    """The Batch API's settings, read once when the app was made (gateway/app.py)."""
    return request.app.state.batch_settings


def expiry_refused(param: str, whose: str, settings: BatchSettings) -> ApiError:
    """OpenAI's per-file expiry (a file's, a batch's output files'): refused, since files keep one retention."""
    return ApiError(400, f"{param}: {whose} own expiry is not supported; files are kept {settings.file_retention_s} s "
                         "(TOKENQ_FILES_RETENTION_S), or until deleted", param=param, code="unsupported_field")


@router.post("/v1/files")
async def create_file(request: Request, caller: Caller = Depends(get_caller),
                      settings: BatchSettings = Depends(batch_settings)) -> dict:
    """Streams the `file` part into Redis line by line, each line checked as it arrives."""
    redis = caller.ctx.redis
    upload = BatchFileUpload(redis, settings, caller.tenant.name)
    await upload.start(redis)
    try:
        form = await stream_form(request.headers.get("content-type"), request.stream(), upload.write)
        purpose = form.fields.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose: only 'batch' files can be uploaded (got {purpose!r})", param="purpose")
        if form.filename is None:
            raise ApiError(400, "file: the form has no `file` part", param="file")
        if any(name.startswith("expires_after") for name in form.fields):  # OpenAI's SDK: expires_after[seconds]
            raise expiry_refused("expires_after", "a file's", settings)
        meta = await upload.finish(form.filename, redis)
    except BaseException:
        await upload.writer.discard()
        raise
    return file_object(meta)


@router.get("/v1/files")
async def get_files(caller: Caller = Depends(get_caller), purpose: str | None = None,
                    limit: int = Query(default=10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc",
                    after: str | None = None) -> dict:
    if purpose is not None and purpose not in PURPOSES:
        raise ApiError(400, f"purpose: one of {', '.join(PURPOSES)} (got {purpose!r})", param="purpose")
    page, more = await list_files(caller.ctx.redis, caller.tenant.name, purpose, limit, order, after)
    return list_page([file_object(m) for m in page], more)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, caller: Caller = Depends(get_caller)) -> dict:
    return file_object(await read_file(caller.ctx.redis, file_id, caller.tenant.name))


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, caller: Caller = Depends(get_caller)) -> StreamingResponse:
    meta = await read_file(caller.ctx.redis, file_id, caller.tenant.name)
    return StreamingResponse(iter_content(caller.ctx.redis, file_id, int(meta["lines"])),
                             media_type="application/jsonl",
                             headers={"Content-Disposition": attachment(meta["filename"])})


def attachment(filename: str) -> str:
    """A Content-Disposition for any file name (RFC 6266): an ASCII name for old clients, the name itself
    percent-encoded as UTF-8 for the rest."""
    plain = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.delete("/v1/files/{file_id}")
async def remove_file(file_id: str, caller: Caller = Depends(get_caller)) -> dict:
    meta = await read_file(caller.ctx.redis, file_id, caller.tenant.name)
    running = await batches_reading(caller.ctx.redis, file_id)
    if running:
        raise ApiError(409, f"file_id: {file_id} is the input of batch {running[0]}, which has not ended; its "
                            "lines are read from the file until it does (cancel the batch, or wait for it)",
                       param="file_id", code="file_in_use")
    await delete_file(caller.ctx.redis, meta)
    return {"id": file_id, "object": "file", "deleted": True}
