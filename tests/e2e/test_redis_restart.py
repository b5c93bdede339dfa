"""Long-running processes outlive a Redis restart: a real `tokenq worker` and `tokenq webhooks` stay up
while their redis-server is killed and started again, and both do their work afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from protocol import job_record as f
from protocol import keys
from protocol.webhook_secret import FIELD as SECRET_FIELD
from protocol.webhook_secret import new_secret
from tests.e2e.test_recovery import jobs_for
from tests.fakes import submit_job
from tests.integration.test_webhooks import ALLOW, TENANT, Receiver, finish, flaky, new_job
from tests.processes import RestartableRedis, stop_process

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "TOKENQ_WEBHOOK_ALLOW": ALLOW}
    return subprocess.Popen([sys.executable, "-m", "tokenq", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


async def until(pred, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await pred()
        except (OSError, aioredis.RedisError):
            value = None
        if value:
            return value
        await asyncio.sleep(0.2)
    tails = "\n".join(p.read_text()[-3000:] for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


async def _warned_loops(log: Path) -> list[str]:
    """The loops that logged the start of an outage, one entry per warning."""
    return [json.loads(line)["loop"] for line in log.read_text().splitlines()
            if "redis unreachable" in line and line.startswith("{")]


async def test_worker_and_deliverer_survive_a_redis_restart(default_model_dir, tmp_path):
    server = RestartableRedis(tmp_path)
    server.start()
    logs = [tmp_path / "worker.log", tmp_path / "webhooks.log"]
    worker = spawn(["worker", "--redis-url", server.url, "--model", MODEL, "--max-num-seqs", "4",
                    "--kv-cache-gb", "0.25", "--max-model-len", "2048"], logs[0])
    webhooks = spawn(["webhooks", "--redis-url", server.url], logs[1])
    r = aioredis.from_url(server.url, decode_responses=True)
    try:
        await until(lambda: r.keys(keys.worker_key("*")), 120, "the worker's heartbeat", logs)
        await until(lambda: r.keys("*health-check*"), 60, "the deliverer's health check", logs)

        server.kill()
        # Both notice once the client's own retries (worker/service.py) run out; how soon depends on the
        # machine's load, so wait for the warnings rather than a fixed time.
        for log in logs:
            await until(lambda log=log: _warned_loops(log), 60, f"an outage warning in {log.name}", logs)
        assert worker.poll() is None and webhooks.poll() is None, "\n".join(p.read_text()[-3000:] for p in logs)
        server.start()
        await asyncio.sleep(2.0)
        assert worker.poll() is None, logs[0].read_text()[-3000:]
        assert webhooks.poll() is None, logs[1].read_text()[-3000:]

        # The worker runs a job submitted after the restart.
        [job] = jobs_for(default_model_dir, 1, max_tokens=4)
        await submit_job(r, job)

        async def job_done() -> bool:
            return await r.hget(keys.job_key(job.id), f.STATE) == "succeeded"

        await until(job_done, 120, "the job after the restart", logs)

        # The deliverer delivers a webhook of a job finished after the restart.
        secret = new_secret()
        await r.hset(keys.tenant_key(TENANT), SECRET_FIELD, secret)
        with Receiver(secret, flaky) as receiver:
            hooked = await new_job(r, receiver.url("/after-restart"))
            await finish(r, hooked)

            async def delivered() -> bool:
                return bool(receiver.accepted)

            await until(delivered, 60, "the webhook after the restart", logs)
        assert worker.poll() is None and webhooks.poll() is None
    finally:
        await r.aclose()
        codes = [stop_process(p) for p in (worker, webhooks)]
        server.stop()
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
    # One warning per loop for the one outage, not one per retry.
    for log in logs:
        warned = await _warned_loops(log)
        assert warned and len(warned) == len(set(warned)), (log.name, warned)


async def test_roles_started_before_redis_wait_for_it(default_model_dir, tmp_path):
    """A worker, a deliverer and a batch feeder started while their Redis is not up yet (a compose file
    whose Redis starts last) wait for it with back-off, one warning each, then do their work."""
    server = RestartableRedis(tmp_path)  # its port is chosen; nothing listens yet
    logs = [tmp_path / "worker.log", tmp_path / "webhooks.log", tmp_path / "batches.log"]
    procs = [spawn(["worker", "--redis-url", server.url, "--model", MODEL, "--max-num-seqs", "4",
                    "--kv-cache-gb", "0.25", "--max-model-len", "2048"], logs[0]),
             spawn(["webhooks", "--redis-url", server.url], logs[1]),
             spawn(["batches", "--redis-url", server.url], logs[2])]
    r = aioredis.from_url(server.url, decode_responses=True)
    try:
        expected = {"worker start", "webhook service start", "batch scan"}
        for log in logs:
            await until(lambda log=log: _warned_loops(log), 120, f"an outage warning in {log.name}", logs)
        assert {loop for log in logs for loop in await _warned_loops(log)} == expected
        assert all(p.poll() is None for p in procs), "\n".join(p.read_text()[-3000:] for p in logs)
        server.start()
        await until(lambda: r.keys(keys.worker_key("*")), 60, "the worker's heartbeat", logs)
        await until(lambda: r.keys("*health-check*"), 60, "the deliverer's health check", logs)
        [job] = jobs_for(default_model_dir, 1, max_tokens=4)
        await submit_job(r, job)

        async def job_done() -> bool:
            return await r.hget(keys.job_key(job.id), f.STATE) == "succeeded"

        await until(job_done, 120, "the job", logs)
    finally:
        await r.aclose()
        codes = [stop_process(p) for p in procs]
        server.stop()
    assert codes == [0, 0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
    for log in logs:  # one warning for the wait, not one per attempt
        assert len(await _warned_loops(log)) == 1, (log.name, log.read_text()[-2000:])
