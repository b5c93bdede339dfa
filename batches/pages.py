"""One page of a tenant's files or batches: their ids come from a sorted set, their records from hashes."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from gateway.errors import ApiError

READ_AT_ONCE = 100  # hashes read in one pipelined round trip


async def read_page(redis: aioredis.Redis, ids: list[str], after: str | None, key_of: Callable[[str], str],
                    limit: int, keep: Callable[[dict[str, str]], bool] | None = None,
                    ) -> tuple[list[dict[str, str]], bool, list[str]]:
    """Up to `limit` records (in `ids`' order, after the id `after`) that `keep` accepts, whether more follow,
    and the ids read whose record is gone (expired), for the caller to prune from its index. An `after` not
    in `ids` is a 400."""
    if after is not None:
        if after not in ids:  # starting over would hand a client paging through the list items twice
            raise ApiError(400, f"after: {after!r} is not in this list (deleted, expired, or never in it); list "
                                "again without `after`", param="after")
        ids = ids[ids.index(after) + 1:]
    page: list[dict[str, str]] = []
    gone: list[str] = []
    for start in range(0, len(ids), READ_AT_ONCE):
        chunk = ids[start:start + READ_AT_ONCE]
        async with redis.pipeline(transaction=False) as pipe:
            for record_id in chunk:
                pipe.hgetall(key_of(record_id))
            records = await pipe.execute()
        gone += [i for i, record in zip(chunk, records, strict=True) if not record]
        for record in records:
            if record and (keep is None or keep(record)):
                if len(page) == limit:
                    return page, True, gone
                page.append(record)
    return page, False, gone
