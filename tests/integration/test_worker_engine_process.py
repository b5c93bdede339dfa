"""The worker with its engine in a process of its own (the served path), on the CPU: jobs run through it,
a dead engine process makes the worker exit non-zero with its jobs left for recovery, and tensor
parallelism over two gloo ranks gives the same greedy tokens as one rank."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from protocol import job_record as f
from protocol import keys
from protocol.events import DeltaEvent
from protocol.jobs import JobPayload, JobResult, new_job_id
from protocol.sampling import SamplingParams
from tests.fakes import submit_job
from tests.integration.test_worker_service import Collector, final_state, wait_until
from worker.service import WorkerService

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from worker.models.random_weights import write_random_model_dir

    return write_random_model_dir("tiny", tmp_path_factory.mktemp("tiny"))


def spec(path, name: str = "m", tp: int = 1, **config):
    from worker.engine.config import EngineConfig
    from worker.engine_process import EngineSpec

    cfg = EngineConfig(num_kv_blocks=config.pop("num_kv_blocks", 128), max_model_len=512,
                       tensor_parallel_size=tp, **config)
    return EngineSpec(str(path), cfg, name)


async def run_jobs(redis_url, redis_client, engine_spec, jobs: list[JobPayload], worker_id: str,
                   timeout: float = 300) -> list[JobResult]:
    for p in jobs:
        await submit_job(redis_client, p, streamed=p.stream)
    service = WorkerService(redis_url, engine_spec.served_name, engine_spec, None, worker_id=worker_id,
                            block_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        hashes = [await final_state(redis_client, p.id, timeout=timeout) for p in jobs]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert not service.engine_failed
    return [JobResult.model_validate_json(h[f.RESULT]) for h in hashes]


def greedy_jobs(model: str, prompts: list[list[int]], max_tokens: int) -> list[JobPayload]:
    return [JobPayload(id=new_job_id(model), model=model, kind="completion", prompt_token_ids=p,
                       sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for p in prompts]


async def _running_a_long_job(redis_url, redis_client, model_dir, worker_id: str):
    """A worker (its engine in a process) running one long greedy job: the service, its task, the job and the
    engine process's pid."""
    job = greedy_jobs("m", [[1, 2, 3]], max_tokens=400)[0]
    await submit_job(redis_client, job)
    service = WorkerService(redis_url, "m", spec(model_dir, max_num_seqs=4), None, worker_id=worker_id,
                            block_ms=100, grace_s=1.0)
    task = asyncio.create_task(service.run(asyncio.Event()))

    async def running():
        state = await redis_client.hget(keys.job_key(job.id), f.STATE)
        return state == "running" and service.engine_loop is not None and service.engine_loop.pid

    return service, task, job, await wait_until(running, 120)


async def test_jobs_run_in_the_engine_process(redis_url, redis_client, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # put back afterwards
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    ids = [5, 17, 99, 3]
    jobs = [JobPayload(id=new_job_id("m"), model="m", kind="completion", prompt_token_ids=ids, stream=s,
                       sampling=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1))
            for s in (True, False)]
    async with Collector(redis_client, jobs[0].id) as c:
        results = await run_jobs(redis_url, redis_client, spec(tiny_model_dir), jobs, "proc:1")
        await c.wait_final()
    assert results[0].token_ids == results[1].token_ids and len(results[0].token_ids) == 10
    assert results[0].text.split()[0].startswith("t") and results[0].logprobs and results[0].logprobs[0].token
    assert "".join(d.text for d in c.events if isinstance(d, DeltaEvent)) == results[0].text
    # What the CPU engine process was started with: a short spin, then sleep.
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]) == ("PASSIVE", "3000")


async def test_an_engine_that_cannot_hold_one_sequence_refuses_to_start_naming_the_setting(tiny_model_dir):
    """A KV cache smaller than one sequence of max_model_len: a request growing to its context could never
    finish, so the engine does not start (it used to, and such a request ended in an error mid-output)."""
    from worker.engine.config import ConfigError
    from worker.engine_process import EngineProcess

    handle = EngineProcess(spec(tiny_model_dir, num_kv_blocks=None, kv_cache_memory_gb=1e-5))
    with pytest.raises(ConfigError) as refused:
        await handle.start()
    assert refused.value.field == "kv_cache_memory_gb"
    assert "must hold one sequence of max_model_len 512" in refused.value.reason
    assert not handle.alive


async def test_a_worker_whose_engine_refuses_its_settings_exits_as_a_bad_flag_does(redis_url, tiny_model_dir):
    """One line naming the flag and EXIT_SETTINGS, which `tokenq up` does not start again."""
    import subprocess
    import sys

    from tests.conftest import free_port
    from tokenq.flag_checks import EXIT_SETTINGS

    argv = [sys.executable, "-m", "tokenq", "worker", "--redis-url", redis_url, "--model", str(tiny_model_dir),
            "--kv-cache-gb", "0.00001", "--max-model-len", "512", "--metrics-port", str(free_port())]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == EXIT_SETTINGS, done.stderr
    assert "error: --kv-cache-gb must hold one sequence of max_model_len 512" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_stalled_engine_is_killed_and_its_worker_fails_over(redis_url, redis_client, tiny_model_dir,
                                                                     monkeypatch):
    """An engine step that never ends (a rank stopped with SIGSTOP, or stuck in a collective, which waits
    without a timeout): the worker held its jobs for good, renewing their leases. Now it kills the engine
    after TOKENQ_ENGINE_STALL_S without a report and exits, its job left for another worker."""
    monkeypatch.setenv("TOKENQ_ENGINE_STALL_S", "2")
    service, task, job, pid = await _running_a_long_job(redis_url, redis_client, tiny_model_dir, "stalls:1")
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.wait_for(task, 60)  # the worker does not hang
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert service.engine_failed and "engine stalled" in service.engine_loop.error
    assert not os.path.exists(f"/proc/{pid}")  # killed, not left stopped
    assert await redis_client.hget(keys.job_key(job.id), f.STATE) in ("queued", "running")


async def test_a_rank_that_dies_while_the_engine_is_idle_ends_the_engine(tiny_model_dir):
    """Found while idle, so the worker starts again before a request comes, instead of that request paying for
    the failed step and the restart."""
    from worker.engine_process import EngineProcess

    handle = EngineProcess(spec(tiny_model_dir, tp=2))
    await handle.start()
    try:
        children = [int(p) for p in open(f"/proc/{handle.pid}/task/{handle.pid}/children").read().split()]
        [rank_1] = [p for p in children if "spawn_main" in open(f"/proc/{p}/cmdline").read()]  # not the tracker
        os.kill(rank_1, signal.SIGKILL)
        await asyncio.wait_for(handle.dead.wait(), 30)
    finally:
        await handle.close(timeout=5)
    assert "engine process exited" in handle.error


async def test_dead_engine_process_fails_over_and_worker_exits_non_zero(redis_url, redis_client, tiny_model_dir):
    service, task, job, pid = await _running_a_long_job(redis_url, redis_client, tiny_model_dir, "dies:1")
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(task, 60)  # the worker does not hang
    assert service.engine_failed
    # Not final, handed back (or left to its lease): another worker reruns it.
    assert await redis_client.hget(keys.job_key(job.id), f.STATE) in ("queued", "running")
    pending = await redis_client.xpending(keys.jobs_stream("m", job.lane, job.tenant), keys.GROUP)
    assert pending["pending"] == 1  # left in the group, claimable by another worker


@pytest.mark.parametrize("which", ["tiny", "default"])
async def test_tensor_parallel_two_ranks_equal_one(redis_url, redis_client, tiny_model_dir, which, request):
    path = tiny_model_dir if which == "tiny" else request.getfixturevalue("default_model_dir")
    prompts = [[(11 * i + j) % 300 + 2 for j in range(4 + 3 * i)] for i in range(4)]
    out = {}
    for tp in (1, 2):
        jobs = greedy_jobs("m", prompts, max_tokens=16)
        out[tp] = [r.token_ids for r in await run_jobs(redis_url, redis_client, spec(path, tp=tp), jobs,
                                                          f"tp{tp}:1")]
    assert all(len(t) == 16 for t in out[1])
    assert out[2] == out[1]
