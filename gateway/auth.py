"""Who is calling: `Authorization: Bearer <key>` → a tenant and its limits.

Auth fails closed. It is on once a key has been made (a flag in Redis), and stays on when the last key is
revoked or the keys vanish from Redis; only an operator turns it off (`tokenq keys auth off`, the flag set
to "off"). A gateway that has seen auth on keeps it on while Redis holds neither the flag nor a key (a
flushed or replaced Redis), and `TOKENQ_REQUIRE_AUTH=1` keeps it on whatever Redis holds. Every answer from Redis (keys exist, key → tenant,
tenant → limits) is trusted for `CACHE_S`, so the hot path costs no Redis round trip and a revoked key
or a changed limit takes effect within that time on every gateway process."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.apikeys import API_KEYS_SET, AUTH_FLAG, AUTH_OFF, AUTH_ON, LIMIT_FIELDS, key_digest
from gateway.errors import ApiError
from gateway.flight import TtlCache
from protocol import keys
from tokenq.settings import Settings

CACHE_S = 1.0
# Limits (not keys: a revoked key must stop at once) may lag: past CACHE_S the last read still answers, up
# to this much longer, while a background read renews it.
LIMITS_STALE_S = 5.0
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    """A tenant and its limits; 0 means no limit."""

    name: str
    rpm: int = 0
    tpm: int = 0
    max_queued: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_queued)


def _int(value: str | None) -> int:
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        return 0


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Authenticator:
    def __init__(self, redis: aioredis.Redis, cache_s: float = CACHE_S, stale_s: float = LIMITS_STALE_S,
                 require: bool | None = None) -> None:
        self.redis = redis
        self.cache_s = cache_s
        self.stale_s = stale_s
        self.require = Settings.from_env().require_auth if require is None else require
        self.seen_on = False  # this process has seen auth on: a Redis that forgot it does not turn it off
        self._cache = TtlCache()

    async def auth_on(self) -> bool:
        if self.require:
            return True
        return await self._cache.get(AUTH_FLAG, self._read_auth, self.cache_s)

    async def renew_auth_on(self) -> bool:
        """`auth_on`, read now: the gateway's warm-up calls it more often than CACHE_S, so that no request
        waits for this read (the flag has no stale window: it must not lag)."""
        if self.require:
            return True
        return await self._cache.renew(AUTH_FLAG, self._read_auth)

    async def _read_auth(self) -> bool:
        flag = await self.redis.get(AUTH_FLAG)
        if flag == AUTH_OFF:
            self.seen_on = False
            return False
        if flag == AUTH_ON or await self.redis.exists(API_KEYS_SET):
            self.seen_on = True
        return self.seen_on

    async def tenant_of_key(self, api_key: str) -> str | None:
        key = keys.api_key_key(key_digest(api_key))
        return await self._cache.get(key, lambda: self.redis.hget(key, "tenant"), self.cache_s)

    async def tenant(self, name: str) -> Tenant:
        return await self._cache.get(keys.tenant_key(name), lambda: self._load_tenant(name), self.cache_s,
                                     self.stale_s)

    async def _load_tenant(self, name: str) -> Tenant:
        values = await self.redis.hmget(keys.tenant_key(name), list(LIMIT_FIELDS))
        return Tenant(name, **{field: _int(v) for field, v in zip(LIMIT_FIELDS, values, strict=True)})

    async def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant, or 401 when auth is on and the key is missing or unknown."""
        if not await self.auth_on():
            return await self.tenant(DEFAULT_TENANT)
        token = bearer_token(authorization)
        if token is None:
            raise _unauthorized("missing API key: send it as `Authorization: Bearer <key>`")
        name = await self.tenant_of_key(token)
        if name is None:
            raise _unauthorized("incorrect API key provided")
        return await self.tenant(name)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
