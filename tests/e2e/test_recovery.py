"""Recovery with real processes: real worker processes on the default model, a real Redis, kill -9.

(a) two workers share 20 jobs; one is killed mid-run; the other reruns its jobs after the lease.
(b) Redis itself is killed and restarted (append-only file, fsync always) while 200 jobs are submitted
    through a real gateway over HTTP; every job that got a 202 ends final.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from tokenizers import Tokenizer

from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobPayload, new_job_id
from protocol.sampling import SamplingParams
from tests.conftest import free_port
from tests.fakes import submit_job
from tests.processes import RestartableRedis, stop_process

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
LEASE_S = 2.0
FINAL = {"succeeded", "failed", "cancelled", "expired"}


class Worker:
    """`python -m tokenq worker` as a child process, its output in a log file."""

    def __init__(self, redis_url: str, log: Path, max_num_seqs: int) -> None:
        self.metrics_port = free_port()
        env = {**os.environ, "TOKENQ_LEASE_S": str(LEASE_S), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenq", "worker", "--redis-url", redis_url, "--model", MODEL,
             "--max-num-seqs", str(max_num_seqs), "--kv-cache-gb", "0.25", "--max-model-len", "2048",
             "--metrics-port", str(self.metrics_port)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.id = f"{socket.gethostname()}:{self.proc.pid}"

    async def ready(self, r) -> bool:
        """Heartbeating yet? (Raises if the process has exited.)"""
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return bool(await r.exists(keys.worker_key(self.id)))

    def metric(self, name: str) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + "{"))

    def stop(self) -> int:
        return stop_process(self.proc)


def jobs_for(model_dir: Path, n: int, max_tokens: int) -> list[JobPayload]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [JobPayload(id=new_job_id(MODEL), model=MODEL, kind="completion",
                       prompt_token_ids=tok.encode(f"Story number {i}: once upon a time, in a land far away").ids,
                       sampling=SamplingParams(max_tokens=max_tokens, temperature=0)) for i in range(n)]


async def wait_for(pred, timeout: float, what: str, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await pred()
        if value:
            return value
        await asyncio.sleep(0.1)
    tails = "\n".join(p.read_text()[-3000:] for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


async def hashes(r, jobs: list[JobPayload]) -> list[dict[str, str]]:
    pipe = r.pipeline(transaction=False)
    for p in jobs:
        pipe.hgetall(keys.job_key(p.id))
    return await pipe.execute()


async def test_killed_worker_jobs_are_rerun_by_the_other(redis_url, redis_client, default_model_dir, tmp_path):
    r = redis_client
    # Each worker can hold all 20, so the survivor always has room for the victim's jobs: what is measured
    # is the recovery, not the survivor's queue.
    workers = [Worker(redis_url, tmp_path / f"worker{i}.log", max_num_seqs=20) for i in range(2)]
    logs = [w.log for w in workers]
    finals: dict[str, int] = {}
    pubsub = r.pubsub()
    try:
        for w in workers:
            await wait_for(lambda w=w: w.ready(r), 120, "worker start", logs)
        await pubsub.psubscribe(keys.events_pattern("*"))

        async def count_finals() -> None:
            async for msg in pubsub.listen():
                if msg["type"] == "pmessage" and json.loads(msg["data"]).get("type") == "state":
                    finals[msg["channel"]] = finals.get(msg["channel"], 0) + 1

        counter = asyncio.create_task(count_finals())
        jobs = jobs_for(default_model_dir, 20, max_tokens=16)
        for p in jobs:
            await submit_job(r, p)

        async def running_on() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {w.id: [] for w in workers}
            for p, h in zip(jobs, await hashes(r, jobs), strict=True):
                if h.get(f.STATE) == "running" and h.get(f.WORKER) in out:
                    out[h[f.WORKER]].append(p.id)
            return out

        async def all_taken() -> bool:
            return sum(map(len, (await running_on()).values())) == 20

        await wait_for(all_taken, 60, "all jobs to start", logs)
        await asyncio.sleep(0.5)  # mid-generation
        on = await running_on()
        victim, survivor = sorted(workers, key=lambda w: -len(on[w.id]))
        in_flight = on[victim.id]
        victim.proc.send_signal(signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        victim.proc.wait()

        async def all_final() -> bool:
            return all(h.get(f.STATE) in FINAL for h in await hashes(r, jobs))

        await wait_for(all_final, 60, "every job to end", logs)
        took = time.monotonic() - killed_at
        async def every_final_heard() -> bool:
            return all(keys.events_channel(p.id) in finals for p in jobs)

        # Each job's final event, then a moment more in which a duplicate would show.
        await wait_for(every_final_heard, 30, "every job's final event", logs)
        await asyncio.sleep(0.3)
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
        final = await hashes(r, jobs)
        rerun_after = max(float(h[f.STARTED_AT]) for p, h in zip(jobs, final, strict=True) if p.id in in_flight)
        print(f"\n{len(in_flight)} jobs in flight on the killed worker, rerun {rerun_after - killed_wall:.1f}s "
              f"after the kill; all 20 final {took:.1f}s after it (lease {LEASE_S}s)")
        assert [h[f.STATE] for h in final] == ["succeeded"] * 20
        assert all(finals.get(keys.events_channel(p.id)) == 1 for p in jobs), finals  # one final write each
        for p, h in zip(jobs, final, strict=True):
            if p.id in in_flight:
                assert h[f.WORKER] == survivor.id and h[f.ATTEMPTS] == "2"
        assert in_flight
        assert survivor.metric("tokenq_duplicate_final_writes_total") == 0
        assert survivor.metric("tokenq_worker_reclaimed_entries_total") >= len(in_flight)
        stream = keys.jobs_stream(MODEL, "default", "default")
        assert await r.xlen(stream) == 0 and (await r.xpending(stream, keys.GROUP))["pending"] == 0
        assert await r.xlen(keys.dead_stream(MODEL)) == 0
        # Rerun once the lease lapsed, not at the next lease after that; the bounds are loose so that a busy
        # 2-core machine passes (the recovery time itself is a figure for a benchmark, not a test).
        assert rerun_after - killed_wall <= 2 * LEASE_S + 10
        assert took <= 2 * LEASE_S + 30, f"{took:.1f}s"
        assert survivor.stop() == 0  # SIGTERM drains and exits cleanly
    finally:
        await pubsub.aclose()
        for w in workers:
            w.stop()


class Gateway:
    """`python -m tokenq gateway` as a child process, its output in a log file."""

    def __init__(self, redis_url: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TOKENQ_REDIS_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenq", "gateway", "--redis-url", redis_url, "--port", str(self.port)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    async def ready(self, client: httpx.AsyncClient) -> bool:
        """Answering /readyz with 200 and a live worker yet? (Raises if it has exited.)"""
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            r = await client.get("/readyz", timeout=1)
            return r.status_code == 200 and r.json().get("workers", 0) > 0
        except httpx.HTTPError:
            return False

    def stop(self) -> int:
        return stop_process(self.proc)


N_JOBS = 200
SUBMIT_EVERY_S = 0.1  # a steady 10 submissions a second: ~20 s of them, the outage in the middle
KILL_AFTER = 30  # accepted submissions before Redis is killed
DOWN_S = 1.5  # how long Redis stays down


async def test_redis_restart_loses_no_job(tmp_path):
    """Restart Redis during a run of 200 jobs submitted over HTTP, the append-only file on (fsync always):
    every job that got a 202 ends final. Submissions made while Redis is down may get a 503 (or lose their
    connection); they are counted, not held against it. Any other 5xx is a failure."""
    red = RestartableRedis(tmp_path)
    red.start()
    worker = Worker(red.url, tmp_path / "worker.log", max_num_seqs=32)
    gateway = Gateway(red.url, tmp_path / "gateway.log")
    logs = [worker.log, gateway.log]
    r = aioredis.from_url(red.url, decode_responses=True)
    client = httpx.AsyncClient(base_url=gateway.base, timeout=30)
    accepted: list[str] = []  # ids answered 202, in order
    unavailable: list[int] = []  # submission numbers answered 503
    conn_errors: list[tuple[int, str]] = []  # submission numbers whose connection failed, and why
    failures: list[tuple[int, int, str]] = []  # any other answer: (number, status, body)
    while_down: list[int] = []  # submissions started while Redis was down
    down = False
    try:
        await wait_for(lambda: worker.ready(r), 120, "worker start", logs)
        await wait_for(lambda: gateway.ready(client), 60, "gateway ready", logs)

        async def submit(i: int) -> None:
            if down:
                while_down.append(i)
            body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": 4,
                    "temperature": 0}
            try:
                resp = await client.post("/v1/jobs", json=body)
            except httpx.HTTPError as e:
                conn_errors.append((i, repr(e)))
                return
            if resp.status_code == 202:
                accepted.append(resp.json()["id"])
            elif resp.status_code == 503:
                unavailable.append(i)
            else:
                failures.append((i, resp.status_code, resp.text[:300]))

        async def submit_all() -> None:
            tasks = []
            t0 = time.monotonic()
            for i in range(N_JOBS):
                tasks.append(asyncio.create_task(submit(i)))
                await asyncio.sleep(max(0.0, t0 + (i + 1) * SUBMIT_EVERY_S - time.monotonic()))
            await asyncio.gather(*tasks)

        started = time.monotonic()
        submitter = asyncio.create_task(submit_all())

        async def enough_accepted() -> bool:
            assert not submitter.done() or submitter.exception() is None
            return len(accepted) >= KILL_AFTER

        await wait_for(enough_accepted, 60, f"{KILL_AFTER} accepted submissions", logs)
        await r.aclose()
        red.kill()
        down = True
        killed_at = time.monotonic()
        await asyncio.sleep(DOWN_S)
        red.start()
        down = False
        restarted = time.monotonic()
        r = aioredis.from_url(red.url, decode_responses=True)
        await asyncio.wait_for(submitter, 120)
        submitted = time.monotonic()

        async def states() -> dict[str, str]:
            pipe = r.pipeline(transaction=False)
            for job_id in accepted:
                pipe.hget(keys.job_key(job_id), f.STATE)
            return dict(zip(accepted, await pipe.execute(), strict=True))

        async def all_final() -> bool:
            return all(s in FINAL for s in (await states()).values())

        await wait_for(all_final, 90, "every accepted job to end", logs)
        done = time.monotonic()
        # And as a client sees them, through the gateway.
        views = [(await client.get(f"/v1/jobs/{job_id}")) for job_id in accepted]
        print(f"\n{N_JOBS} submissions over {submitted - started:.1f}s: {len(accepted)} accepted (202), "
              f"{len(unavailable)} 503, {len(conn_errors)} connection errors, {len(failures)} other; "
              f"{len(while_down)} started while Redis was down ({restarted - killed_at:.1f}s); "
              f"all accepted final {done - restarted:.1f}s after the restart, {done - started:.1f}s in all")
        assert not failures, failures
        assert not [e for e in conn_errors if e[0] not in while_down], conn_errors
        assert len(accepted) >= 150, (len(accepted), len(unavailable), conn_errors)
        assert len(set(accepted)) == len(accepted)
        assert while_down, "no submission was made while Redis was down"
        assert all(v.status_code == 200 for v in views), [v.text for v in views if v.status_code != 200]
        assert [v.json()["status"] for v in views] == ["succeeded"] * len(accepted)
        assert set((await states()).values()) == {"succeeded"}
        assert worker.proc.poll() is None and gateway.proc.poll() is None  # both rode out the outage
        stream = keys.jobs_stream(MODEL, "default", "default")

        async def acked() -> bool:
            return await r.xlen(stream) == 0 and (await r.xpending(stream, keys.GROUP))["pending"] == 0

        await wait_for(acked, 10, "the entries to be acknowledged", logs)
        assert gateway.stop() == 0  # drained on SIGTERM and exited 0 (uvicorn's re-raised signal is absorbed)
        assert "Application shutdown complete" in gateway.log.read_text()
        assert worker.stop() == 0
    finally:
        await client.aclose()
        gateway.stop()
        worker.stop()
        await r.aclose()
        if red.proc is not None and red.proc.poll() is None:
            red.proc.terminate()
            red.proc.wait()
