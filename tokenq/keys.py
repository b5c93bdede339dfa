"""`tokenq keys create|list|revoke|auth|secret`: API keys, tenant limits, the auth switch (storage in
gateway/apikeys.py) and a tenant's webhook secret."""

from __future__ import annotations

import argparse
import datetime as dt

from gateway.apikeys import (
    API_KEYS_SET,
    auth_state,
    check_tenant_name,
    create_key,
    list_keys,
    revoke_key,
    set_auth,
)
from jobstore.connect import AnyRedis
from protocol import webhook_secret
from protocol.keys import tenant_key
from respcache import policy
from tokenq.redis_command import run_with_redis


def add_parser(sub: argparse._SubParsersAction, redis_url: str | None) -> None:
    keys = sub.add_parser("keys", help="create, list or revoke API keys (auth is on from the first key until "
                                       "`tokenq keys auth off`)")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ksub.add_parser("create", help="a new key for a tenant; prints it once, with the tenant's "
                                            "webhook secret")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (0: no limit)")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute, prompt + max_tokens")
    create.add_argument("--max-queued", type=int, default=None, help="jobs queued or running at once")
    create.add_argument("--if-none", action="store_true",
                        help="create it only when no key exists yet (a deployment's init step: runs every start)")
    create.add_argument("--cache-mode", choices=["exact", "semantic", "off"], default=None,
                        help="the tenant's default response cache mode (docs/caching.md)")
    create.add_argument("--cache-threshold", type=float, default=None, help="semantic hit threshold (0 to 1)")
    create.add_argument("--cache-ttl", type=int, default=None, help="seconds a cached answer lives")
    create.add_argument("--cache-max-entries", type=int, default=None, help="cached answers kept for the tenant")
    ksub.add_parser("list", help="every key's id, tenant and the tenant's limits")
    revoke = ksub.add_parser("revoke", help="revoke a key, given the key or its id (8+ characters)")
    revoke.add_argument("key")
    auth = ksub.add_parser("auth", help="show auth's state, or turn it on or off (it stays as set: revoking "
                                        "the last key does not turn it off)")
    auth.add_argument("switch", nargs="?", choices=["on", "off"])
    secret = ksub.add_parser("secret", help="print a tenant's webhook signing secret (made on first use), to "
                                            "verify its webhooks with")
    secret.add_argument("--tenant", default="default",
                        help="default: `default`, the tenant of every caller while auth is off")
    secret.add_argument("--rotate", action="store_true",
                        help="replace it with a new one (deliveries from now on, retries too, are signed with it)")
    for p in (create, ksub.choices["list"], revoke, auth, secret):
        p.add_argument("--redis-url", default=redis_url)
    keys.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    return run_with_redis(args.redis_url, lambda redis: _run(redis, args))


async def _run(redis: AnyRedis, args: argparse.Namespace) -> int:
    if args.keys_cmd == "create":
        if args.if_none and await redis.scard(API_KEYS_SET) > 0:
            print("API keys exist already; none created (auth is on)")
            return 0
        limits = {"rpm": args.rpm, "tpm": args.tpm, "max_queued": args.max_queued}
        cache = {field: value for field, value in zip(
            policy.FIELDS, (args.cache_mode, args.cache_threshold, args.cache_ttl, args.cache_max_entries),
            strict=True) if value is not None}
        try:
            for field, value in cache.items():  # checked before anything is written
                policy.check_setting(field, value)
            created = await create_key(redis, args.tenant, limits)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if cache:
            await redis.hset(tenant_key(args.tenant), mapping={field: str(value) for field, value in cache.items()})
        print(f"api key:        {created.api_key}")
        print(f"key id:         {created.digest[:12]}")
        print(f"tenant:         {created.tenant}")
        print(f"webhook secret: {created.webhook_secret}")
        print("The key is shown only now; Redis keeps only its SHA-256.")
        return 0
    if args.keys_cmd == "list":
        rows = await list_keys(redis)
        print("id\ttenant\tcreated\trpm\ttpm\tmax_queued")
        for r in rows:
            created = dt.datetime.fromtimestamp(float(r["created_at"] or 0), dt.UTC).strftime("%Y-%m-%d %H:%M")
            limits = "\t".join(r[name] if r[name] not in (None, "", "0") else "-"  # 0: no limit, as unset
                               for name in ("rpm", "tpm", "max_queued"))
            print(f"{r['id'][:12]}\t{r['tenant']}\t{created}\t{limits}")
        return 0
    if args.keys_cmd == "secret":
        try:
            check_tenant_name(args.tenant)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if args.rotate:
            print(await webhook_secret.rotate(redis, args.tenant))
        else:
            print(await webhook_secret.tenant_secret(redis, args.tenant))
        return 0
    if args.keys_cmd == "auth":
        if args.switch is not None:
            await set_auth(redis, args.switch == "on")
        state = await auth_state(redis) or "off (no key was ever made)"
        print(f"auth: {state}")
        if state == "off":
            print("every caller is the `default` tenant (unless a gateway runs with TOKENQ_REQUIRE_AUTH=1)")
        return 0
    try:
        revoked = await revoke_key(redis, args.key)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not revoked:
        print("no such key")
        return 1
    print(f"revoked {revoked[0][:12]}")
    return 0
