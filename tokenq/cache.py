"""`tokenq cache purge|remove`: an operator's way to drop a tenant's response-cache entries without its API
key (a tenant uses DELETE /v1/cache and /v1/cache/entries/{id}; both act through respcache/store.py)."""

from __future__ import annotations

import argparse

from jobstore.connect import AnyRedis, is_cluster_url
from respcache import store
from respcache.keys import ENTRY_ID, ENTRY_ID_RULE
from tokenq.redis_command import run_with_redis


def add_parser(sub: argparse._SubParsersAction, redis_url: str | None) -> None:
    cache = sub.add_parser("cache", help="remove a tenant's response-cache entries (docs/caching.md)")
    csub = cache.add_subparsers(dest="cache_cmd", required=True)
    purge = csub.add_parser("purge", help="remove every entry of a tenant")
    purge.add_argument("--tenant", required=True)
    remove = csub.add_parser("remove", help="remove entries of a tenant by id (a hit's x-tokenq-cache-entry)")
    remove.add_argument("--tenant", required=True)
    remove.add_argument("entry_ids", nargs="+", metavar="ENTRY_ID")
    for p in (purge, remove):
        p.add_argument("--redis-url", default=redis_url)
    cache.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    if args.redis_url and is_cluster_url(args.redis_url):
        raise SystemExit("error: the response cache needs a single-node Redis")
    return run_with_redis(args.redis_url, lambda redis: _run(redis, args))


async def _run(redis: AnyRedis, args: argparse.Namespace) -> int:
    if args.cache_cmd == "purge":
        print(f"removed {await store.purge(redis, args.tenant)} entries of tenant {args.tenant!r}")
        return 0
    bad = [i for i in args.entry_ids if not ENTRY_ID.fullmatch(i)]
    if bad:
        raise SystemExit(f"error: ENTRY_ID must be {ENTRY_ID_RULE} (got {', '.join(map(repr, bad))})")
    found, removed = 0, set()
    for entry_id in args.entry_ids:
        held = await store.remove_answer(redis, args.tenant, entry_id)
        found += entry_id in held or entry_id in removed
        removed.update(held)
    others = len(removed - set(args.entry_ids))
    print(f"removed {found} of {len(args.entry_ids)} entries of tenant {args.tenant!r}"
          + (f", and {others} other entries of the same answers" if others else ""))
    return 0 if found == len(args.entry_ids) else 1
