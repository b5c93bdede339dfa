"""`tokenq up`: every role on one machine. Redis (embedded unless a URL is given), one worker, the
gateway, the webhook service and the batch feeder as child processes; Ctrl-C or SIGTERM stops every child cleanly, workers
first drained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from tokenq.embedded_redis import EmbeddedRedis
from tokenq.settings import tokenq_home


@dataclass
class UpOptions:
    redis_url: str | None
    model: str
    host: str
    port: int
    worker_args: list[str]


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokenq", *args], env=env)


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float) -> bool:
    """Until the gateway at `url` (its /readyz) is ready and reports a live worker: a gateway is ready
    without one (jobs wait in the queue), but the stack is up only once one serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200 and json.loads(r.read()).get("workers", 0) > 0:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    return False


def stop_children(procs: Sequence[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM them all (each drains in parallel), then wait for each; SIGKILL one past the timeout."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def run_up(opts: UpOptions) -> int:
    redis: EmbeddedRedis | None = None
    url = opts.redis_url
    if url is None:
        redis = EmbeddedRedis(tokenq_home() / "redis").start()
        url = redis.url
        print(f"embedded Redis on {url} (append-only file in {redis.data_dir})", flush=True)
    env = {**os.environ, "TOKENQ_REDIS_URL": url, "TOKENQ_MODEL": opts.model}
    worker = _spawn(["worker", "--model", opts.model, *opts.worker_args], env)
    gateway = _spawn(["gateway", "--host", opts.host, "--port", str(opts.port)], env)
    webhooks = _spawn(["webhooks"], env)
    batches = _spawn(["batches"], env)
    children = [worker, gateway, webhooks, batches]

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    base = f"http://{opts.host}:{opts.port}"
    if wait_ready(f"{base}/readyz", children, timeout=600):
        print(f"\ntokenq is up at {base}  (model {opts.model}; Ctrl-C stops)\n"
              f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{opts.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
              flush=True)
    code = 0
    try:
        while not stopping:
            dead = [p for p in children if p.poll() is not None]
            if dead:
                code = dead[0].returncode or 1
                print(f"a child process exited with {dead[0].returncode}; stopping", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        # Gateway first (no new jobs), then the worker drains, then webhooks (it relays the jobs the drain
        # finished and lets attempts in flight end), then Redis writes its append-only file.
        for group in ((gateway, worker, batches), (webhooks,)):
            stop_children(group)
        if redis is not None:
            redis.stop()
    return code
