"""The Batch API with real processes: the gateway (uvicorn), `tokenq batches`, and real engine workers
(the tiny random-weight model, so that 1,000 lines take a minute or two on a CPU). A worker is killed with SIGKILL mid-batch, then Redis itself is restarted from its
append-only file and the feeder is killed too; every custom_id still lands exactly once in the output or
error file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import redis

from protocol import job_record as f
from protocol import keys
from tests.batch_helpers import assert_each_once, completion_lines, result_lines, upload, wait_batch
from tests.conftest import free_port
from tests.processes import GatewayThread, RestartableRedis, stop_process
from worker.models.random_weights import write_random_model_dir

pytestmark = pytest.mark.slow

N_LINES = 1000
MODEL = "tiny"
LEASE_S = 2.0


class Worker:
    """`python -m tokenq worker` on the tiny model as a child process."""

    def __init__(self, redis_url: str, model_dir: Path, log: Path) -> None:
        env = {**os.environ, "TOKENQ_LEASE_S": str(LEASE_S), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenq", "worker", "--redis-url", redis_url, "--model", str(model_dir),
             "--served-name", MODEL, "--max-num-seqs", "64", "--kv-cache-gb", "0.05",
             "--metrics-port", str(free_port())],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.id = f"{socket.gethostname()}:{self.proc.pid}"

    def stop(self) -> int:
        return stop_process(self.proc)


class Feeder:
    """`python -m tokenq batches` as a child process."""

    def __init__(self, redis_url: str, log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENQ_BATCH_WINDOW": "96", "TOKENQ_BATCH_REFILL": "16",
               "TOKENQ_BATCH_POLL_S": "0.1", "TOKENQ_BATCH_LEASE_S": "2"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenq", "batches", "--redis-url", redis_url],
                                     env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def stop(self) -> int:
        return stop_process(self.proc)


def wait_until(pred, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text()[-3000:] for p in logs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def running_jobs(r: redis.Redis) -> dict[str, str]:
    """Job key -> the worker running it."""
    job_keys = list(r.scan_iter(keys.job_keys_pattern(), count=1000))
    with r.pipeline(transaction=False) as pipe:
        for k in job_keys:
            pipe.hmget(k, [f.STATE, f.WORKER])
        rows = pipe.execute()
    return {k: worker for k, (state, worker) in zip(job_keys, rows, strict=True) if state == "running"}


def test_worker_killed_and_redis_restarted_mid_batch(tmp_path):
    model_dir = write_random_model_dir("tiny", tmp_path / "tiny")
    red = RestartableRedis(tmp_path)
    red.start()
    r = redis.Redis.from_url(red.url, decode_responses=True)
    workers = [Worker(red.url, model_dir, tmp_path / f"worker{i}.log") for i in range(2)]
    feeder = Feeder(red.url, tmp_path / "feeder.log")
    logs = [w.log for w in workers] + [feeder.log]
    lines = completion_lines(N_LINES, MODEL, max_tokens=24, words=24, temperature=0.7)
    try:
        wait_until(lambda: all(r.exists(keys.worker_key(w.id)) for w in workers), 180, "workers", logs)
        with GatewayThread(red.url) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=5)
            t0 = time.monotonic()
            batch = client.batches.create(input_file_id=upload(client, lines).id,
                                          endpoint="/v1/completions", completion_window="24h")

            def done_count() -> int:
                counts = client.batches.retrieve(batch.id).request_counts
                return counts.completed + counts.failed

            wait_until(lambda: done_count() >= N_LINES // 4, 300, "a quarter of the lines", logs)
            def busiest() -> tuple[int, Worker]:
                running = list(running_jobs(r).values())
                return max((running.count(w.id), i) for i, w in enumerate(workers))

            wait_until(lambda: busiest()[0] >= 4, 60, "a worker running several lines", logs)
            victim = workers[busiest()[1]]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            # What the dead worker was running: jobs it started and, being dead, never finished.
            on_victim = [k for k, worker in running_jobs(r).items() if worker == victim.id]
            in_flight = len(on_victim)
            wait_until(lambda: done_count() >= N_LINES // 2, 300, "half of the lines", logs)
            red.kill()
            time.sleep(1.0)
            red.start()
            feeder.proc.send_signal(signal.SIGKILL)  # and the feeder: another takes over once its lease lapses
            feeder.proc.wait()
            feeder = Feeder(red.url, tmp_path / "feeder2.log")
            logs.append(feeder.log)
            batch = wait_batch(client, batch.id, timeout=600)
            took = time.monotonic() - t0
            out, err = result_lines(client, batch)
        print(f"\n{N_LINES} lines in {took:.1f}s; {in_flight} running on the killed worker; "
              f"{len(out)} in the output file, {len(err)} in the error file")
        assert in_flight > 0
        reruns = [r.hmget(k, [f.STATE, f.ATTEMPTS]) for k in on_victim]
        assert all(state == "succeeded" and int(attempts) >= 2 for state, attempts in reruns), reruns
        assert batch.status == "completed", batch
        assert_each_once([line["custom_id"] for line in lines], out, err)
        assert not err, err[:3]
        assert batch.request_counts.completed == N_LINES
        assert all(o["response"]["body"]["usage"]["completion_tokens"] > 0 for o in out)
    finally:
        feeder.stop()
        for w in workers:
            w.stop()
        red.stop()
