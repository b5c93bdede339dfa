"""Work that a request starts but that outlives it (a shared read, the semantic cache's load) logs none of
that request's keys: its lines named the job of the request that happened to start it."""

from __future__ import annotations

import asyncio

import structlog
from structlog.testing import capture_logs

from gateway.flight import SingleFlight
from gateway.logging import bind_job
from respcache.semantic import SemanticCache


def _in_a_request(coro_fn):
    """Run coro_fn() as a request does: in a task of its own, after bind_job."""
    async def request():
        bind_job("job-of-the-first-request")
        return await coro_fn()

    return asyncio.create_task(request())


async def test_a_shared_read_runs_in_no_requests_context():
    async def read():
        return structlog.contextvars.get_contextvars()

    flight = SingleFlight()
    assert await _in_a_request(lambda: flight.run("models", read)) == {}


class _EmptyRedis:
    async def xrevrange(self, *args, **kwargs):
        return []

    async def scan_iter(self, **kwargs):
        return
        yield

    async def xread(self, *args, **kwargs):
        await asyncio.sleep(3600)


async def _load_lines(cache: SemanticCache) -> list[dict]:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
        try:
            await asyncio.gather(_in_a_request(lambda: cache.ready(timeout=10)), return_exceptions=True)
            await asyncio.gather(cache.start(), return_exceptions=True)
            await asyncio.sleep(0)  # the load's done callbacks
        finally:
            await cache.aclose()
    return lines


async def test_the_semantic_caches_load_logs_no_requests_job(monkeypatch):
    monkeypatch.setattr(SemanticCache, "_load_models", lambda self: None)
    [line] = await _load_lines(SemanticCache(_EmptyRedis()))
    assert line["event"] == "semantic cache loaded" and "job_id" not in line


async def test_a_failed_semantic_load_logs_no_requests_job(monkeypatch):
    def missing(self):
        raise ImportError("the cache extra is not installed")

    monkeypatch.setattr(SemanticCache, "_load_models", missing)
    [line] = await _load_lines(SemanticCache(_EmptyRedis()))
    assert line["event"] == "semantic cache unavailable" and "job_id" not in line
