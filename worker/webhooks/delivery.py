"""One delivery attempt of a job's or a batch's webhook (the arq function `deliver_webhook`).

Before every attempt the host is resolved and every address checked (protocol/urlguard.py); the request
then goes to a checked address itself, with the original name only in the Host header and TLS SNI (and
certificate check), so a second DNS answer can never point it somewhere else. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from arq import Retry
from structlog.typing import FilteringBoundLogger as Logger

from protocol import job_record as F
from protocol.outage import REDIS_AWAY, is_redis_oom
from protocol.urlguard import HostNotFound, IPAddress, UnsafeURL, resolve_public
from protocol.webhook_secret import tenant_secret
from tokenq.logs import get_logger
from tokenq.settings import Settings
from worker.webhooks import attempts as store
from worker.webhooks.event import message_id, signed_headers
from worker.webhooks.metrics import DELIVERIES
from worker.webhooks.policy import RetryPolicy, parse_retry_after, retryable
from worker.webhooks.subjects import load_subject

FUNCTION = "deliver_webhook"
CTX_KEY = "webhooks"  # the Deliverer in arq's ctx
USER_AGENT = "tokenq-webhooks/0.1"
MAX_ADDRESSES = 3  # tried in turn on connection errors; bounds an attempt's time (arq's timeout)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: float | None


def new_http_client(verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """No connection reuse (a TLS connection checked for one name must not carry another's request),
    no proxies from the environment (the checked address is what we connect to), no redirects."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False,
                             follow_redirects=False, verify=verify)


class Deliverer:
    def __init__(self, redis: aioredis.Redis, http: httpx.AsyncClient, policy: RetryPolicy,
                 allow: str | None = None) -> None:
        self.redis = redis
        self.http = http
        self.policy = policy
        self.allow = Settings.from_env().webhook_allow if allow is None else allow

    async def deliver(self, job_id: str) -> str:
        """One attempt; returns the outcome, or raises arq's Retry when another attempt is scheduled."""
        log = get_logger("webhooks", job_id=job_id)
        subject = await load_subject(self.redis, job_id)
        url = subject.url if subject else None
        if subject is None or not url:
            DELIVERIES.labels("gone").inc()
            log.warning("webhook record gone or without webhook_url; nothing to deliver")
            return "gone"
        tenant = subject.tenant
        if await store.endpoint_disabled(self.redis, tenant, url):
            return await self._end(job_id, log, store.Attempt("skipped", error="endpoint disabled (410 Gone)"))
        attempt_no = len(F.webhook_attempts(subject.record)) + 1
        body = subject.body
        headers = signed_headers(await tenant_secret(self.redis, tenant), message_id(job_id), body)
        try:
            addrs = await resolve_public(url, self.allow)
            answer = await self._post(url, addrs, headers, body)
        except HostNotFound as e:
            return await self._retry(job_id, log, attempt_no, None, str(e))
        except UnsafeURL as e:
            log.warning("webhook URL refused", reason=str(e), address=str(e.address) if e.address else None)
            return await self._end(job_id, log, store.Attempt("refused", error=str(e)))
        except (httpx.TransportError, TimeoutError) as e:
            return await self._retry(job_id, log, attempt_no, None, f"{type(e).__name__}: {e}".rstrip(": "))
        except Exception as e:  # noqa: BLE001 - a request that cannot even be built will not build later
            log.exception("webhook attempt raised")
            return await self._end(job_id, log, store.Attempt("failed", error=f"{type(e).__name__}: {e}"))
        if 200 <= answer.status < 300:
            return await self._end(job_id, log, store.Attempt("delivered", status=answer.status))
        if answer.status == 410:
            await store.disable_endpoint(self.redis, tenant, url, self.policy.gone_disable_s)
            return await self._end(job_id, log, store.Attempt("disabled", status=410, error="410 Gone"))
        if retryable(answer.status):
            return await self._retry(job_id, log, attempt_no, answer, f"HTTP {answer.status}")
        error = "redirect not followed" if 300 <= answer.status < 400 else f"HTTP {answer.status}"
        return await self._end(job_id, log, store.Attempt("failed", status=answer.status, error=error))

    async def _post(self, url: str, addrs: list[IPAddress], headers: dict[str, str], body: str) -> Answer:
        """POST to the first checked address that accepts a connection."""
        target = httpx.URL(url)
        headers = {**headers, "host": target.netloc.decode("ascii"), "user-agent": USER_AGENT}
        extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else {}
        error: Exception = httpx.ConnectError("no address")
        for addr in addrs[:MAX_ADDRESSES]:
            request = self.http.build_request("POST", target.copy_with(host=str(addr)), headers=headers,
                                              content=body.encode(), extensions=extensions,
                                              timeout=self.policy.timeout_s)
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    response = await self.http.send(request, stream=True)  # the body is never read
                    await response.aclose()
            except httpx.ConnectError as e:
                error = e
                continue
            return Answer(response.status_code, parse_retry_after(response.headers.get("retry-after")))
        raise error

    async def _retry(self, job_id: str, log: Logger, attempt_no: int, answer: Answer | None, error: str) -> str:
        status = answer.status if answer else None
        delay = self.policy.delay_after(attempt_no, answer.retry_after if answer else None)
        if delay is None:
            return await self._end(job_id, log, store.Attempt(
                "failed", status=status, error=f"{error}; gave up after {attempt_no} attempts"))
        await store.record_attempt(self.redis, job_id, store.Attempt(
            "retry", status=status, error=error, next_retry_at=time.time() + delay))
        DELIVERIES.labels("retry").inc()
        log.info("webhook attempt failed; retrying", attempt=attempt_no, status=status, error=error,
                 retry_in_s=delay)
        raise Retry(defer=delay)

    async def _end(self, job_id: str, log: Logger, attempt: store.Attempt) -> str:
        await store.record_attempt(self.redis, job_id, attempt)
        DELIVERIES.labels(attempt.outcome).inc()
        level = log.info if attempt.outcome == "delivered" else log.warning
        level("webhook " + attempt.outcome, status=attempt.status, error=attempt.error)
        return attempt.outcome


async def deliver_webhook(ctx: dict, job_id: str) -> str:
    """The arq job: one attempt at delivering the final state of job (or batch) `job_id`."""
    deliverer: Deliverer = ctx[CTX_KEY]
    try:
        return await deliverer.deliver(job_id)
    except Exception as e:
        # Nothing recorded: Redis is away, or full and refusing writes; try again (a job that arq cannot even
        # reschedule stays on its queue and runs again once its in-progress mark lapses).
        if not (isinstance(e, REDIS_AWAY) or is_redis_oom(e)):
            raise
        get_logger("webhooks", job_id=job_id).warning("webhook attempt lost its Redis", error=str(e))
        raise Retry(defer=deliverer.policy.delays[0] if deliverer.policy.delays else 5) from e
