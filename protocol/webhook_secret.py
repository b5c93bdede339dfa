"""A tenant's webhook signing secret: where it lives (a field of the tenant's settings hash) and its
Standard Webhooks format. `tokenq keys` shows it; the delivery service signs with it."""

from __future__ import annotations

import base64
import secrets

import redis.asyncio as aioredis

from protocol import keys

FIELD = "webhook_secret"  # of keys.tenant_key(tenant)


def new_secret() -> str:
    """`whsec_` and the base64 of a random 32-byte HMAC key."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def tenant_secret(redis: aioredis.Redis, tenant: str) -> str:
    """The tenant's secret, made on first use (HSETNX: concurrent first uses agree on one)."""
    key = keys.tenant_key(tenant)
    await redis.hsetnx(key, FIELD, new_secret())
    return await redis.hget(key, FIELD)


async def rotate(redis: aioredis.Redis, tenant: str) -> str:
    """A new secret for the tenant: every delivery attempt from now on, retries included, is signed with it."""
    secret = new_secret()
    await redis.hset(keys.tenant_key(tenant), FIELD, secret)
    return secret
