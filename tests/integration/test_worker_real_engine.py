"""The worker around the real engine and the default model (slow: loads the model on the CPU)."""

from __future__ import annotations

import pytest

from protocol import job_record as f
from protocol.events import DeltaEvent
from protocol.jobs import JobPayload, JobResult, new_job_id
from protocol.sampling import SamplingParams
from tests.fakes import submit_job
from tests.integration.test_worker_service import Collector, final_state
from worker.service import WorkerService

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


async def test_real_engine_streamed_and_plain_jobs(redis_url, redis_client, default_model_dir):
    import asyncio

    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(default_model_dir, EngineConfig(num_kv_blocks=256, max_model_len=512))
    card = engine.model_card("smol")
    ids = engine.tokenizer.encode("The capital of France is").ids
    jobs = [JobPayload(id=new_job_id("smol"), model="smol", kind="completion", prompt_token_ids=ids, stream=s,
                       sampling=SamplingParams(max_tokens=12, temperature=0, logprobs=1)) for s in (True, False)]
    async with Collector(redis_client, jobs[0].id) as c:
        for p in jobs:
            await submit_job(redis_client, p, streamed=p.stream)
        service = WorkerService(redis_url, "smol", engine, card, worker_id="real:1", block_ms=100)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            hashes = [await final_state(redis_client, p.id, timeout=120) for p in jobs]
            await c.wait_final()
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    results = [JobResult.model_validate_json(h[f.RESULT]) for h in hashes]
    assert results[0].text == results[1].text and results[0].token_ids == results[1].token_ids  # greedy
    assert results[0].usage.completion_tokens == len(results[0].token_ids) == 12
    assert results[0].logprobs and results[0].logprobs[0].token != ""
    deltas = [e for e in c.events if isinstance(e, DeltaEvent)]
    assert "".join(d.text for d in deltas) == results[0].text
