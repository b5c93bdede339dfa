"""API keys and tenant settings in Redis. A key is stored only as its SHA-256 digest, so a copy of Redis
does not hand out working keys; the tenant's settings hash holds its limits and its webhook secret.

`tokenq keys` (tokenq/keys.py) writes these; the gateway's auth (gateway/auth.py) reads them."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from jobstore.connect import pipeline
from protocol import keys, webhook_secret

# Set of the digests of every live key.
API_KEYS_SET = f"{keys.PREFIX}:apikeys"
# "on" from the first key on, "off" only when an operator turns auth off (`tokenq keys auth off`): revoking
# the last key, or losing the key set, does not turn auth off.
AUTH_FLAG = f"{keys.PREFIX}:auth"
AUTH_ON, AUTH_OFF = "on", "off"
KEY_PREFIX = "tq_"
LIMIT_FIELDS = ("rpm", "tpm", "max_queued")


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class CreatedKey:
    api_key: str
    digest: str
    tenant: str
    webhook_secret: str


def check_tenant_name(tenant: str) -> None:
    if not tenant or ":" in tenant or len(tenant) > 64:
        raise ValueError("tenant: 1 to 64 characters, no ':'")


async def create_key(redis: aioredis.Redis, tenant: str, limits: dict[str, int | None]) -> CreatedKey:
    """A new key for `tenant`; limits given here replace the tenant's, the webhook secret is kept."""
    check_tenant_name(tenant)
    for name, value in limits.items():
        if value is not None and value < 0:
            raise ValueError(f"{name}: 0 (no limit) or more, got {value}")
    api_key = new_api_key()
    digest = key_digest(api_key)
    settings = {name: str(value) for name, value in limits.items() if name in LIMIT_FIELDS and value is not None}
    candidate = webhook_secret.new_secret()
    async with pipeline(redis) as pipe:  # on a cluster not atomic: a partial create fails closed
        pipe.hsetnx(keys.tenant_key(tenant), webhook_secret.FIELD, candidate)
        if settings:
            pipe.hset(keys.tenant_key(tenant), mapping=settings)
        pipe.hset(keys.api_key_key(digest), mapping={"tenant": tenant, "created_at": repr(time.time())})
        pipe.sadd(API_KEYS_SET, digest)
        pipe.set(AUTH_FLAG, AUTH_ON)
        pipe.hget(keys.tenant_key(tenant), webhook_secret.FIELD)
        *_, secret = await pipe.execute()
    return CreatedKey(api_key, digest, tenant, secret)


async def list_keys(redis: aioredis.Redis) -> list[dict[str, str]]:
    """Every key: its digest (the id to revoke it by), tenant, creation time and the tenant's limits."""
    digests = sorted(await redis.smembers(API_KEYS_SET))
    rows = []
    for digest in digests:
        record = await redis.hgetall(keys.api_key_key(digest))
        if not record:
            continue
        tenant = record.get("tenant", "")
        limits = await redis.hmget(keys.tenant_key(tenant), list(LIMIT_FIELDS))
        rows.append({"id": digest, "tenant": tenant, "created_at": record.get("created_at", ""),
                     **{name: value or "" for name, value in zip(LIMIT_FIELDS, limits, strict=True)}})
    return rows


async def revoke_key(redis: aioredis.Redis, key_or_id: str) -> list[str]:
    """Revoke by the key itself, or by its digest or a unique digest prefix (8+ characters, as listed).
    Returns the digests revoked (none or one)."""
    if key_or_id.startswith(KEY_PREFIX):
        matches = [key_digest(key_or_id)]
    elif len(key_or_id) >= 8:
        matches = [d for d in await redis.smembers(API_KEYS_SET) if d.startswith(key_or_id.lower())]
    else:
        raise ValueError("give the key, or at least 8 characters of its id")
    if len(matches) != 1:
        if matches:
            raise ValueError(f"{key_or_id!r} matches {len(matches)} keys; give more of the id")
        return []
    digest = matches[0]
    async with pipeline(redis) as pipe:  # on a cluster not atomic: a partial create fails closed
        pipe.delete(keys.api_key_key(digest))
        pipe.srem(API_KEYS_SET, digest)
        deleted, removed = await pipe.execute()
    return [digest] if deleted or removed else []


async def set_auth(redis: aioredis.Redis, on: bool) -> None:
    """The operator's switch: auth stays as set here whatever keys come and go (a new key turns it on)."""
    await redis.set(AUTH_FLAG, AUTH_ON if on else AUTH_OFF)


async def auth_state(redis: aioredis.Redis) -> str | None:
    """"on", "off", or None when no key was ever made (nor the switch used)."""
    return await redis.get(AUTH_FLAG)
