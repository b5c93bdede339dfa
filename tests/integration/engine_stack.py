"""The gateway in-process (ASGI) in front of a worker that runs the real engine: the whole path of a job
without sockets or a second process, for tests that check answers against the engine itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from gateway.app import create_app
from worker.engine.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.service import WorkerService


@asynccontextmanager
async def gateway_with_engine(redis_url: str, model_dir: Path, config: EngineConfig,
                              model: str = "tiny") -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway once the worker is ready; `client.engine` is the worker's engine and
    `client.model_dir` its model."""
    engine = LLMEngine(model_dir, config)
    service = WorkerService(redis_url, model, engine, engine.model_card(model), worker_id=f"{model}:1",
                            block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    app = create_app(redis_url)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                         timeout=60) as client:
                for _ in range(200):  # until the worker's heartbeat and card are in
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                client.engine = engine  # type: ignore[attr-defined]
                client.model_dir = model_dir  # type: ignore[attr-defined]
                yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
