"""`tokenq up`: every role on one machine. Redis (embedded unless a URL is given), one worker, the
gateway, the webhook service and the batch feeder as child processes. A child that exits is started again after an
exponential back-off (a crash of one role is not the end of the stack), unless it exits as a bad flag does
(EXIT_SETTINGS: its settings cannot work, and no restart cures them), which stops the stack; otherwise only
Ctrl-C or SIGTERM stops them all, cleanly, workers drained first and Redis last (tokenq/child_process.py: why they do not take the
terminal's Ctrl-C themselves). One `tokenq up` per TOKENQ_HOME (tokenq/home_lock.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenq.child_process import start_child
from tokenq.embedded_redis import EmbeddedRedis
from tokenq.flag_checks import EXIT_SETTINGS, listen_error
from tokenq.home_lock import HomeLock, HomeLocked
from tokenq.redis_command import redacted
from tokenq.settings import METRICS_PEERS_ENV, Settings, embedded_redis_dir, hot_loop_env, tokenq_home

RESTART_BASE_S = 1.0
RESTART_CAP_S = 60.0
STABLE_S = 60.0  # a child that ran this long before it exited starts over at the base back-off
METRICS_HOST = "127.0.0.1"  # the worker's and the deliverer's metrics: tenant labels stay on this host


@dataclass
class UpOptions:
    redis_url: str | None
    model: str
    host: str
    port: int
    worker_args: list[str]
    worker_metrics_port: int
    webhooks_metrics_port: int
    batches_metrics_port: int
    device: str = "auto"  # the worker's (it is in worker_args too): whether the hot loop is on (hot_loop_env)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return start_child([sys.executable, "-m", "tokenq", *args], env=env)


class Child:
    """One role: `start()` runs it; `watch()` notices its exit and starts it again once its back-off has
    passed (doubling from RESTART_BASE_S up to RESTART_CAP_S while it keeps dying young)."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen]) -> None:
        self.name = name
        self._start = start
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.delay = RESTART_BASE_S
        self.restarts = 0
        self.refused_settings = False  # it exited with EXIT_SETTINGS: not started again

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.restart_at = None
        try:
            self.proc = self._start()
        except Exception as e:  # noqa: BLE001 - e.g. the embedded Redis did not come up: try again later
            print(f"could not start {self.name}: {e}", file=sys.stderr, flush=True)
            self.proc = None
            self._schedule(time.monotonic(), "failed to start")

    def send_signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def watch(self) -> None:
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.start()
            return
        if self.proc is not None and self.proc.poll() is not None:
            if self.proc.returncode == EXIT_SETTINGS:
                if not self.refused_settings:
                    print(f"{self.name} cannot run with these settings (its error is above); tokenq up stops",
                          file=sys.stderr, flush=True)
                self.refused_settings = True
                return
            if now - self.started_at >= STABLE_S:
                self.delay = RESTART_BASE_S
            self._schedule(now, f"exited with {self.proc.returncode}")

    def _schedule(self, now: float, why: str) -> None:
        print(f"{self.name} {why}; starting it again in {self.delay:.0f}s", file=sys.stderr, flush=True)
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, RESTART_CAP_S)


class StopSignal:
    """The handler of Ctrl-C and SIGTERM: the first one stops the stack (in order, by the caller); a second one
    is passed on to the worker, which then skips its drain's grace."""

    def __init__(self, worker: Child) -> None:
        self.worker = worker
        self.stopping = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:
            self.worker.send_signal(signal.SIGTERM)
        self.stopping = True


def serving(url: str) -> bool:
    """The gateway at `url` (its /readyz) is ready and reports a live worker: a gateway is ready without one
    (jobs wait in the queue), but the stack is up only once one serves."""
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200 and json.loads(r.read()).get("workers", 0) > 0
    except (OSError, ValueError):
        return False


def wait_ready(url: str, procs: Sequence[subprocess.Popen], timeout: float) -> bool:
    """Until the stack at `url` serves; False at once if one of procs exits (the benches' stacks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        if serving(url):
            return True
        time.sleep(0.3)
    return False


def _wait_ready(url: str, timeout: float, stopping: Callable[[], bool], children: Sequence[Child]) -> bool:
    """Until the stack at `url` serves, starting again any child that exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        for child in children:
            child.watch()
        if any(child.refused_settings for child in children):
            return False
        if serving(url):
            return True
        time.sleep(0.3)
    return False


STOP_WAIT_S = 30.0  # the least `tokenq up` waits for its roles to stop before it kills one
HAND_BACK_S = 20.0  # after its grace, a draining worker hands back its jobs and its engine stops


def stop_wait_s(drain_grace_s: float) -> float:
    """How long `tokenq up` waits for a role to stop before it kills it: long enough for the worker's whole
    drain (TOKENQ_DRAIN_GRACE_S, then the hand-back), or a long grace would end in a kill that hands nothing
    back and spends one of the jobs' deliveries."""
    return max(STOP_WAIT_S, drain_grace_s + HAND_BACK_S)


def stop_children(procs: Sequence[subprocess.Popen | None], timeout: float = STOP_WAIT_S,
                  names: Sequence[str] | None = None) -> None:
    """SIGTERM them all (each drains in parallel), then wait for each; SIGKILL one past the timeout, saying so."""
    live = [(p, names[i] if names else " ".join(map(str, p.args))) for i, p in enumerate(procs) if p is not None]
    for p, _ in live:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p, name in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"warning: the {name} did not stop within {timeout:g} s; killed", file=sys.stderr, flush=True)
            p.kill()
            p.wait()


def run_up(opts: UpOptions) -> int:
    base = f"http://{opts.host}:{opts.port}"
    lock = HomeLock(tokenq_home())
    try:
        lock.acquire(base)
    except HomeLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        for what, host, port in (("the gateway", opts.host, opts.port),
                                 ("worker metrics", METRICS_HOST, opts.worker_metrics_port),
                                 ("webhook metrics", METRICS_HOST, opts.webhooks_metrics_port),
                                 ("batch feeder metrics", METRICS_HOST, opts.batches_metrics_port)):
            if listen_error(host, port) is not None:
                print(f"error: port {port} ({what}) is taken on {host}; choose another", file=sys.stderr)
                return 1
        return _run(opts, base)
    finally:
        lock.release()


def _run(opts: UpOptions, base: str) -> int:
    children: list[Child] = []
    redis: EmbeddedRedis | None = None
    url = opts.redis_url
    if url is None:
        redis = EmbeddedRedis(embedded_redis_dir())
        redis_child = Child("embedded Redis", lambda: redis.start().proc)  # type: ignore[union-attr, return-value]
        redis_child.start()
        if redis_child.proc is None:
            return 1
        children.append(redis_child)
        url = redis.url
        print(f"embedded Redis on {redacted(url)} (append-only file in {redis.data_dir}; other tokenq commands on this "
              f"TOKENQ_HOME find it by themselves, password and all)", flush=True)
    env = {**os.environ, "TOKENQ_REDIS_URL": url, "TOKENQ_MODEL": opts.model}
    if hot := hot_loop_env(opts.device):
        env.update(hot)
        print("the gateway and the worker poll while a job runs (a GPU host with cores to spare; "
              "TOKENQ_HOT_LOOP=0 turns it off)", flush=True)
    # Their metrics listen on this host only (they carry tenant labels); the gateway's /metrics shows them.
    worker = Child("worker", lambda: _spawn(["worker", "--model", opts.model, "--metrics-port",
                                             str(opts.worker_metrics_port), "--metrics-host", METRICS_HOST,
                                             *opts.worker_args], env))
    # The gateway's /metrics shows the worker's, the deliverer's and the feeder's too (gateway/metrics_peers.py),
    # so one scrape sees every role.
    gateway_env = {**env, METRICS_PEERS_ENV: f"worker=http://127.0.0.1:{opts.worker_metrics_port}/metrics,"
                                     f"webhooks=http://127.0.0.1:{opts.webhooks_metrics_port}/metrics,"
                                     f"batches=http://127.0.0.1:{opts.batches_metrics_port}/metrics"}
    gateway = Child("gateway", lambda: _spawn(["gateway", "--host", opts.host, "--port", str(opts.port)],
                                              gateway_env))
    webhooks = Child("webhook deliverer", lambda: _spawn(
        ["webhooks", "--metrics-port", str(opts.webhooks_metrics_port), "--metrics-host", METRICS_HOST], env))
    batches = Child("batch feeder", lambda: _spawn(
        ["batches", "--metrics-port", str(opts.batches_metrics_port), "--metrics-host", METRICS_HOST], env))
    roles = [worker, gateway, webhooks, batches]
    for child in roles:
        child.start()
    children += roles

    stop = StopSignal(worker)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if _wait_ready(f"{base}/readyz", 600, lambda: stop.stopping, children):
            host = opts.host
            print(f"\ntokenq is up at {base}  (model {opts.model}; Ctrl-C stops)\n"
                  f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                  f"    -d '{{\"model\": \"{opts.model}\", \"messages\": [{{\"role\": \"user\", \"content\": "
                  f"\"Hello!\"}}]}}'\n"
                  f"  metrics: gateway {base}/metrics, worker http://{host}:{opts.worker_metrics_port}/metrics, "
                  f"webhooks http://{host}:{opts.webhooks_metrics_port}/metrics, "
                  f"batches http://{host}:{opts.batches_metrics_port}/metrics\n", flush=True)
        while not stop.stopping and not any(child.refused_settings for child in children):
            for child in children:
                child.watch()
            time.sleep(0.2)
    finally:
        # The gateway, the worker and the batch feeder together (each drains at the same time), then webhooks
        # (it relays the jobs the drain finished and lets attempts in flight end), then Redis writes its
        # append-only file.
        wait_s = stop_wait_s(Settings.from_env().drain_grace_s)
        for group in ((gateway, worker, batches), (webhooks,)):
            stop_children([c.proc for c in group], wait_s, [c.name for c in group])
        if redis is not None:
            redis.stop()
    return EXIT_SETTINGS if any(child.refused_settings for child in children) else 0
