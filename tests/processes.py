"""Real servers for tests: stopping a child cleanly, a redis-server that can die and come back, and the
gateway in a thread."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import redis
import uvicorn

from gateway.app import create_app
from gateway.server import HttpProtocol
from tests.conftest import free_port, redis_server_binary


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (what `tokenq up` sends), then SIGKILL past the timeout; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class RestartableRedis:
    """A redis-server on a fixed port and data directory, append-only file fsynced always, so that it can
    be killed or stopped and started again with its data."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers PING (after loading its append-only file)."""
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.exceptions.RedisError:  # not up, or still loading its AOF
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what the AOF already has."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class GatewayThread:
    """The gateway app under uvicorn (the production HTTP protocol) in a thread; `with` gives its URL."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(redis_url), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on",
                                                    http=HttpProtocol))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
