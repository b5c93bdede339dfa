"""The gateway's side of admission: the Idempotency-Key header's check, the lane depth setting, and the
429 that a refusal of jobstore's submit script becomes. The decision itself (rate limits, max_queued, the
lane's fair share, the key) is one script in jobstore/scripts.py, so several gateway processes share the
same counters and concurrent requests cannot pass a limit between a check and its increment."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from fastapi import Header, Request
from pydantic import BaseModel

from gateway.auth import Tenant
from gateway.errors import ApiError
from gateway.schemas import dump_request
from jobstore import IdempotencyKey, Limits, Refused
from tokenq.settings import Settings

MAX_IDEMPOTENCY_KEY_CHARS = 255
DEFAULT_MAX_QUEUE_DEPTH = 100_000
MAX_QUEUE_DEPTH_ENV = "TOKENQ_MAX_QUEUE_DEPTH"


def max_queue_depth_from_env() -> int:
    return Settings.from_env().max_queue_depth


def idempotency_key_of(sent: Sequence[str]) -> str | None:
    """The request's key, from every Idempotency-Key header it sent (the fast path and the routes alike);
    None without one. One key only: of two, which one the client's retry repeats is a guess (a proxy that
    repeats the header sends one key twice, which is one key)."""
    if len(set(sent)) > 1:
        raise ApiError(400, f"Idempotency-Key: send one key, got {len(set(sent))} different ones",
                       param="Idempotency-Key")
    return check_idempotency_key(sent[0] if sent else None)


def check_idempotency_key(value: str | None) -> str | None:
    """The key's shape; None without one. Printable ASCII only: HTTP carries header bytes that servers read
    as latin-1, so a UTF-8 key would be stored as other characters than the client sent (and counted in
    bytes)."""
    if value is None:
        return None
    printable = value.isascii() and value.isprintable()
    if not printable or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_CHARS:
        got = f"{len(value)} characters" if printable else "a character that is not printable ASCII"
        raise ApiError(400, f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
                            f"(got {got})", param="Idempotency-Key")
    return value


async def idempotency_key(request: Request,
                          documented: str | None = Header(default=None, alias="Idempotency-Key")) -> str | None:
    """The FastAPI routes' key: `documented` puts the header in the OpenAPI spec, the check reads every copy
    of it (Header keeps the first)."""
    return idempotency_key_of(request.headers.getlist("idempotency-key"))


_DELIVERY_FIELDS = frozenset({"stream", "stream_options"})  # how the answer comes, not what it is


def _canonical_number(text: str) -> float | int:
    number = float(text)
    return int(number) if number.is_integer() else number


def idempotency_of(key: str | None, body: BaseModel) -> IdempotencyKey | None:
    """The key with the digest of the request it came with: the route (its body's schema) and every field the
    client set, so that a retry sending the same request in another key order or number spelling matches,
    and one that changes any field does not. Streaming is left out: a client whose connection dropped may
    take up the first job's stream, or its final answer. A prompt list's jobs share one digest (of the whole
    list)."""
    if key is None:
        return None
    # Canonical JSON: object members sorted at every depth (a metadata or schema object's order means nothing),
    # and 1.0 written as 1 (a logit_bias value kept as the client spelled it).
    fields = json.loads(dump_request(body, exclude=_DELIVERY_FIELDS), parse_float=_canonical_number)
    fields = {name: value for name, value in fields.items() if value is not None}  # null is the default
    request = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{type(body).__name__}\n{request}".encode()).hexdigest()
    return IdempotencyKey(key, digest[:32])


def limits_of(tenant: Tenant, max_depth: int) -> Limits:
    return Limits(rpm=tenant.rpm, tpm=tenant.tpm, max_queued=tenant.max_queued, max_depth=max_depth)


def too_large(tenant: Tenant, tokens: int) -> ApiError | None:
    """A 400 for a request of more tokens than the tenant's whole tokens per minute: no wait makes it fit, so
    it is refused before any limit is counted (a 429 for the rpm it also met sent the client to wait for a
    minute that never comes)."""
    if not tenant.tpm or tokens <= tenant.tpm:
        return None
    return ApiError(400, f"max_tokens: the request is too large for the tokens per minute (tpm) of tenant "
                         f"{tenant.name!r}: limit {tenant.tpm}, requested {tokens} (prompt + max_tokens per "
                         "choice); lower max_tokens or shorten the prompt", param="max_tokens",
                    code="request_too_large")


def prompts_too_many(tenant: Tenant, prompts: int, tokens: int) -> ApiError | None:
    """A 400 for a completion of several prompts (one job each) that no wait lets in whole: more prompts than
    the tenant's requests per minute or queued jobs, or more tokens than its tokens per minute."""
    for limit, value, name in ((tenant.rpm, prompts, "requests per minute (rpm)"),
                               (tenant.max_queued, prompts, "queued jobs (max_queued)")):
        if limit and value > limit:
            return ApiError(400, f"prompt: {prompts} prompts are {prompts} jobs, more than the {name} of tenant "
                                 f"{tenant.name!r} ({limit}); send fewer prompts a request", param="prompt",
                            code="request_too_large")
    return too_large(tenant, tokens)


def limit_error(tenant: Tenant, refused: Refused, tokens: int, model: str, lane: str, max_depth: int) -> ApiError:
    retry_after = max(1, math.ceil(refused.wait_ms / 1000))
    used = refused.used
    if refused.limit == "rpm":
        message = (f"rate limit reached for requests per minute (rpm) of tenant {tenant.name!r}: "
                   f"limit {tenant.rpm}, used {used}; try again in {retry_after}s")
        type_, code = "requests", "rate_limit_exceeded"
    elif refused.limit == "tpm":
        if (error := too_large(tenant, tokens)) is not None:  # the tenant's tpm was lowered meanwhile
            return error
        message = (f"rate limit reached for tokens per minute (tpm) of tenant {tenant.name!r}: "
                   f"limit {tenant.tpm}, used {used}, requested {tokens} (prompt + max_tokens per choice); "
                   f"try again in {retry_after}s")
        type_, code = "tokens", "rate_limit_exceeded"
    elif refused.limit == "queue_full":
        message = (f"the {lane!r} lane of model {model!r} is full ({used} jobs queued or running, max queue "
                   f"depth {max_depth}) and tenant {tenant.name!r} holds its fair share of it ({refused.value} "
                   f"jobs: the max depth shared by the tenants with jobs in the lane); try again later")
        type_, code = "queue_depth", "queue_full"
    else:
        message = (f"too many queued jobs (max_queued) for tenant {tenant.name!r}: limit "
                   f"{tenant.max_queued}, queued {used}; try again when some have finished")
        type_, code = "queued_jobs", "max_queued_exceeded"
    return ApiError(429, message, code=code, type_=type_, headers={"Retry-After": str(retry_after)})
