"""A tenant's file quota holds however many uploads finish at once (batches/files.py reserves each upload's
bytes before it counts what the tenant holds)."""

from __future__ import annotations

import asyncio

from batches.files import BatchFileUpload, tenant_usage
from gateway.errors import ApiError
from tests.batch_helpers import chat_lines, fast_settings, jsonl
from tests.integration.fake_worker import MODEL


async def test_uploads_finishing_at_once_stay_within_the_quota(redis_client):
    body = jsonl(chat_lines(4, MODEL))
    settings = fast_settings(tenant_quota_bytes=3 * len(body) + 10)  # room for three
    uploads = [BatchFileUpload(redis_client, settings, "quota-race") for _ in range(8)]
    for upload in uploads:
        await upload.start(redis_client)
        await upload.write(body)
    results = await asyncio.gather(*(u.finish(f"f{i}.jsonl", redis_client) for i, u in enumerate(uploads)),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, ApiError)]
    assert all(r.code == "quota_exceeded" for r in refused)
    assert 1 <= len(results) - len(refused) <= 3
    assert await tenant_usage(redis_client, "quota-race") <= settings.tenant_quota_bytes
    assert int(await redis_client.get("tokenq:files-reserved:quota-race") or 0) == 0  # every reservation released


async def test_an_upload_past_the_quota_stops_as_it_streams(redis_client):
    body = jsonl(chat_lines(50, MODEL))
    upload = BatchFileUpload(redis_client, fast_settings(tenant_quota_bytes=len(body) // 2), "quota-stream")
    await upload.start(redis_client)
    try:
        for i in range(0, len(body), 512):
            await upload.write(body[i:i + 512])
        raise AssertionError("the whole upload was taken past the quota")
    except ApiError as e:
        assert e.code == "quota_exceeded" and upload.size <= len(body) // 2 + 512
    finally:
        await upload.writer.discard()
