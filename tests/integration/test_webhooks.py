"""Webhook delivery end to end: jobs written as the gateway writes them, finished by the real FINISH script
script (which fills the outbox), the relay and arq worker in-process, and a local HTTP receiver that
checks each signature with the Standard Webhooks reference verifier."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from arq import Retry
from prometheus_client import REGISTRY
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.responses import job_object
from jobstore import FinalWrite, JobRef, JobStore
from protocol import job_record as F
from protocol import keys
from protocol.jobs import JobError, JobPayload, JobResult, Usage, new_job_id
from protocol.sampling import SamplingParams
from protocol.webhook_secret import FIELD as SECRET_FIELD
from protocol.webhook_secret import new_secret
from tests.fakes import submit_job
from worker.webhooks import attempts as store
from worker.webhooks.delivery import Deliverer, new_http_client
from worker.webhooks.policy import RetryPolicy
from worker.webhooks.relay import GROUP
from worker.webhooks.service import QUEUE, WebhookService

TENANT = "acme"
FAST = RetryPolicy(delays=(0.2, 0.2, 0.2), timeout_s=2.0)
ALLOW = "127.0.0.1/32"


class Receiver:
    """A loopback HTTP server: `answer(path, n)` decides each response (n counts requests per webhook-id
    and path); only a request whose signature verifies is ever answered 2xx."""

    def __init__(self, secret: str, answer: Callable[[str, int], tuple[int, dict[str, str]]]) -> None:
        self.secret = secret
        self.answer = answer
        self.requests: list[dict] = []
        self.accepted: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                headers = dict(self.headers.items())
                with receiver._lock:
                    n = sum(1 for r in receiver.requests
                            if r["path"] == self.path and r["headers"].get("webhook-id") == headers.get("webhook-id"))
                    receiver.requests.append({"path": self.path, "headers": headers, "body": body})
                status, extra = receiver.answer(self.path, n + 1)
                if 200 <= status < 300:
                    try:
                        event = Webhook(receiver.secret).verify(body, headers)
                    except WebhookVerificationError:
                        status = 400
                    else:
                        with receiver._lock:
                            receiver.accepted.append({"headers": headers, "event": event})
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def flaky(path: str, n: int) -> tuple[int, dict[str, str]]:
    """/flaky fails twice then accepts; /gone is 410; /redirect points at /target; /slow accepts after
    0.8 s; the rest accept at once."""
    if path == "/flaky":
        return (500, {}) if n <= 2 else (200, {})
    if path == "/gone":
        return 410, {}
    if path == "/redirect":
        return 302, {"location": "/target"}
    if path == "/slow":
        time.sleep(0.8)
    return 200, {}


async def new_job(redis, url: str, tenant: str = TENANT) -> str:
    """A queued job as the gateway writes it, naming a webhook."""
    payload = JobPayload(id=new_job_id("fake-model"), model="fake-model", kind="completion", prompt_token_ids=[1, 2],
                         sampling=SamplingParams(max_tokens=4), tenant=tenant, webhook_url=url)
    await redis.sadd(keys.MODELS_SET, payload.model)  # a worker has served it: the relay reads its outbox
    await submit_job(redis, payload)
    await redis.hset(keys.job_key(payload.id), F.WEBHOOK_URL, url)
    return payload.id


async def finish(redis, job_id: str, state: str = "succeeded", text: str = "hello") -> None:
    """The worker's final write, the real script: it puts the job on the webhook outbox."""
    if state == "succeeded":
        field, value = F.RESULT, JobResult(text=text, finish_reason="stop", usage=Usage(
            prompt_tokens=2, completion_tokens=1, total_tokens=3)).model_dump_json()
    else:
        field, value = F.ERROR, JobError(type="engine_error", message="boom").model_dump_json()
    ref = JobRef.of_record(job_id, await redis.hgetall(keys.job_key(job_id)))
    final = FinalWrite(ref, state, value if field == F.RESULT else "", value if field == F.ERROR else "")
    assert await JobStore(redis).write([], [final]) == [1]


async def attempts_when_done(redis, job_id: str, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        attempts = F.webhook_attempts(await redis.hgetall(keys.job_key(job_id)))
        if attempts and attempts[-1]["outcome"] != "retry":
            return attempts
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery of {job_id} did not end: {attempts}")


@contextlib.asynccontextmanager
async def service(redis_url: str, policy: RetryPolicy = FAST, allow: str = ALLOW):
    svc = WebhookService(redis_url, policy=policy, allow=allow, poll_delay=0.05, block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def secret(redis_client) -> str:
    value = new_secret()
    await redis_client.hset(keys.tenant_key(TENANT), SECRET_FIELD, value)
    return value


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("tokenq_webhook_deliveries_total", {"outcome": outcome}) or 0.0


async def test_retried_until_accepted_once_with_one_webhook_id(redis_url, redis_client, secret) -> None:
    delivered_before = _count("delivered")
    with Receiver(secret, flaky) as rx:
        async with service(redis_url):
            ok = await new_job(redis_client, rx.url("/flaky"))
            bad = await new_job(redis_client, rx.url("/flaky"))
            await finish(redis_client, ok, "succeeded", text="hello")
            await finish(redis_client, bad, "failed")
            runs = {job: await attempts_when_done(redis_client, job) for job in (ok, bad)}
            # A second outbox entry for a delivered job (a relay that died before XACK) sends nothing.
            await redis_client.xadd(keys.WEBHOOK_OUTBOX, {"job_id": ok, "state": "succeeded"})
            await asyncio.sleep(0.6)
            assert await redis_client.xlen(keys.WEBHOOK_OUTBOX) == 0
            assert (await redis_client.xpending(keys.WEBHOOK_OUTBOX, GROUP))["pending"] == 0

    for job, state in ((ok, "succeeded"), (bad, "failed")):
        sent = [r for r in rx.requests if r["headers"]["webhook-id"] == f"msg_{job}"]
        assert len(sent) == 3
        assert len({r["body"] for r in sent}) == 1  # the same event every time
        accepted = [a for a in rx.accepted if a["headers"]["webhook-id"] == f"msg_{job}"]
        assert len(accepted) == 1
        event = accepted[0]["event"]
        assert event["type"] == f"job.{state}" and event["data"]["id"] == job
        assert [(a["outcome"], a["status"]) for a in runs[job]] == [("retry", 500), ("retry", 500),
                                                                    ("delivered", 200)]
        assert all(a["next_retry_at"] > a["at"] for a in runs[job][:2])
        shown = job_object(job, await redis_client.hgetall(keys.job_key(job)))["webhook"]  # GET /v1/jobs/{id}
        assert shown == {"url": rx.url("/flaky"), "state": "delivered", "attempts": runs[job]}
    ok_event = next(a["event"] for a in rx.accepted if a["event"]["data"]["id"] == ok)
    assert ok_event["data"]["result"] == {"text": "hello", "finish_reason": "stop", "stop_reason": None}
    assert ok_event["data"]["usage"]["total_tokens"] == 3
    bad_event = next(a["event"] for a in rx.accepted if a["event"]["data"]["id"] == bad)
    assert bad_event["data"]["error"] == {"type": "engine_error", "message": "boom"}
    assert len(rx.requests) == 6
    assert _count("delivered") - delivered_before == 2


async def test_gone_disables_the_endpoint_for_its_tenant_for_a_while(redis_url, redis_client, secret) -> None:
    policy = RetryPolicy(delays=FAST.delays, timeout_s=FAST.timeout_s, gone_disable_s=60)
    with Receiver(secret, flaky) as rx:
        async with service(redis_url, policy=policy):
            first = await new_job(redis_client, rx.url("/gone"))
            await finish(redis_client, first)
            assert [(a["outcome"], a["status"]) for a in await attempts_when_done(redis_client, first)] == [
                ("disabled", 410)]
            assert await store.endpoint_disabled(redis_client, TENANT, rx.url("/gone"))
            assert 0 < await redis_client.ttl(store.endpoint_key(TENANT, rx.url("/gone"))) <= 60
            second = await new_job(redis_client, rx.url("/gone"))
            await finish(redis_client, second)
            [skipped] = await attempts_when_done(redis_client, second)
            # Another tenant's job to the same URL is still delivered (and learns its own 410).
            other = await new_job(redis_client, rx.url("/gone"), tenant="other")
            await finish(redis_client, other)
            [tried] = await attempts_when_done(redis_client, other)
            # Once the mark expires, the first tenant's deliveries go out again.
            await redis_client.delete(store.endpoint_key(TENANT, rx.url("/gone")))
            third = await new_job(redis_client, rx.url("/gone"))
            await finish(redis_client, third)
            [again] = await attempts_when_done(redis_client, third)
    assert skipped["outcome"] == "skipped" and skipped["status"] is None
    assert (tried["outcome"], tried["status"]) == ("disabled", 410)
    assert (again["outcome"], again["status"]) == ("disabled", 410)
    assert len(rx.requests) == 3


async def test_an_attempt_that_raises_is_recorded_as_failed(redis_url, redis_client, secret,
                                                            monkeypatch) -> None:
    async def broken(*args, **kwargs):
        raise RuntimeError("cannot build the request")

    monkeypatch.setattr(Deliverer, "_post", broken)
    with Receiver(secret, flaky) as rx:
        async with service(redis_url):
            job = await new_job(redis_client, rx.url("/ok"))
            await finish(redis_client, job)
            [attempt] = await attempts_when_done(redis_client, job)
    assert attempt["outcome"] == "failed" and "RuntimeError: cannot build the request" in attempt["error"]


async def test_stored_url_with_a_line_break_is_refused_not_dropped(redis_url, redis_client, secret) -> None:
    with Receiver(secret, flaky) as rx:
        async with service(redis_url):
            job = await new_job(redis_client, rx.url("/ok\r\nX-Injected: 1"))
            await finish(redis_client, job)
            [attempt] = await attempts_when_done(redis_client, job)
    assert attempt["outcome"] == "refused" and "control character" in attempt["error"]
    assert rx.requests == []


async def test_redirect_is_not_followed(redis_url, redis_client, secret) -> None:
    with Receiver(secret, flaky) as rx:
        async with service(redis_url):
            job = await new_job(redis_client, rx.url("/redirect"))
            await finish(redis_client, job)
            [attempt] = await attempts_when_done(redis_client, job)
    assert (attempt["outcome"], attempt["status"], attempt["error"]) == ("failed", 302, "redirect not followed")
    assert [r["path"] for r in rx.requests] == ["/redirect"]


async def test_loopback_name_refused_without_allow_list(redis_url, redis_client, secret) -> None:
    with Receiver(secret, flaky) as rx:
        async with service(redis_url, allow=""):
            job = await new_job(redis_client, rx.url("/ok", host="localhost"))
            await finish(redis_client, job)
            [attempt] = await attempts_when_done(redis_client, job)
    assert attempt["outcome"] == "refused" and "non-public" in attempt["error"]
    assert rx.requests == []
    shown = job_object(job, await redis_client.hgetall(keys.job_key(job)))["webhook"]
    assert shown["state"] == "refused" and "127.0.0.1" not in json.dumps(shown)  # no address for the client


async def test_stop_lets_an_attempt_in_flight_finish(redis_url, redis_client, secret) -> None:
    with Receiver(secret, flaky) as rx:
        async with service(redis_url):
            job = await new_job(redis_client, rx.url("/slow"))
            await finish(redis_client, job)
            deadline = time.monotonic() + 10
            while not rx.requests:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        # The service has stopped: the attempt it had sent was answered and recorded first.
        [attempt] = F.webhook_attempts(await redis_client.hgetall(keys.job_key(job)))
    assert (attempt["outcome"], attempt["status"]) == ("delivered", 200)
    assert len(rx.accepted) == 1


async def test_connection_errors_retried_then_given_up(redis_url, redis_client) -> None:
    with Receiver("whsec_" + "A" * 32, flaky) as rx:
        closed = rx.url("/ok")
    async with service(redis_url, policy=RetryPolicy(delays=(0.1,), timeout_s=2.0)):
        job = await new_job(redis_client, closed, tenant="fresh")
        await finish(redis_client, job, "cancelled")
        attempts = await attempts_when_done(redis_client, job)
    assert [a["outcome"] for a in attempts] == ["retry", "failed"]
    assert "ConnectError" in attempts[0]["error"] and "gave up after 2 attempts" in attempts[1]["error"]
    # The tenant had no secret: the first delivery made one, and it stays.
    made = await redis_client.hget(keys.tenant_key("fresh"), SECRET_FIELD)
    assert made and made.startswith("whsec_")


def _tls_server(tmp_path: Path) -> tuple[ThreadingHTTPServer, ssl.SSLContext]:
    """An https receiver on 127.0.0.1 whose self-signed certificate names only `localhost`."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append(self.headers["host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    server.seen = seen  # type: ignore[attr-defined]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    return server, client_ctx


@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="needs openssl to make a certificate")
async def test_https_connects_to_checked_address_with_original_name(redis_client, tmp_path) -> None:
    server, client_ctx = _tls_server(tmp_path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        http = new_http_client(verify=client_ctx)
        deliverer = Deliverer(redis_client, http, FAST, allow="localhost")
        job = await new_job(redis_client, f"https://localhost:{port}/hook")
        await finish(redis_client, job)
        assert await deliverer.deliver(job) == "delivered"
        # The same server by its address fails the certificate check (it names only localhost): retried.
        by_ip = Deliverer(redis_client, http, FAST, allow="127.0.0.1/32")
        other = await new_job(redis_client, f"https://127.0.0.1:{port}/hook")
        await finish(redis_client, other)
        with pytest.raises(Retry):
            await by_ip.deliver(other)
        [attempt] = F.webhook_attempts(await redis_client.hgetall(keys.job_key(other)))
        assert attempt["outcome"] == "retry" and "CERTIFICATE_VERIFY_FAILED" in attempt["error"]
        await http.aclose()
    finally:
        server.shutdown()
        server.server_close()
    # The certificate was checked against `localhost` (SNI), and Host kept the name and port.
    assert server.seen == [f"localhost:{port}"]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_cli_process_stops_cleanly_on_sigterm(redis_url) -> None:
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.delete(QUEUE + ":health-check")
    proc = subprocess.Popen([sys.executable, "-m", "tokenq", "webhooks", "--redis-url", redis_url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not r.exists(QUEUE + ":health-check"):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "webhooks service did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "webhook service stopped" in (proc.stderr.read().decode() if proc.stderr else "")
