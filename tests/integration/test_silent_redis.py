"""A Redis that accepts connections and never answers (stopped with SIGSTOP, stuck behind a long script): the
gateway's probes and the CLI's commands end with what is wrong instead of hanging; `tokenq status --watch`
rides out a Redis that goes away and comes back."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from gateway.redis_client import PROBE_TIMEOUT_S
from tests.processes import RestartableRedis
from tokenq import redis_command
from tokenq.cli import build_parser


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A listening socket that takes connections (the kernel's backlog accepts them) and never replies."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


async def test_readyz_and_metrics_answer_while_redis_is_silent(silent_redis):
    app = create_app(silent_redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            started = time.monotonic()
            ready = await client.get("/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["reason"] == "redis_unavailable"
            metrics = await client.get("/metrics", timeout=30)
            assert metrics.status_code == 200 and "tokenq_gateway" in metrics.text
            assert time.monotonic() - started < 4 * PROBE_TIMEOUT_S + 10  # not the prober's own timeout


def test_a_command_on_a_silent_redis_ends_with_its_error_line(silent_redis, monkeypatch):
    monkeypatch.setattr(redis_command, "REPLY_TIMEOUT_S", 0.5)
    args = build_parser().parse_args(["status", "--redis-url", silent_redis, "--json"])
    with pytest.raises(SystemExit) as ended:
        args.func(args)
    assert str(ended.value.code).startswith("error: Redis at redis://127.0.0.1:")
    assert "did not answer within 0.5 s" in str(ended.value.code)


def test_status_watch_rides_out_a_redis_that_goes_away_and_comes_back(tmp_path):
    server = RestartableRedis(tmp_path)
    server.start()
    proc = subprocess.Popen([sys.executable, "-m", "tokenq", "status", "--redis-url", server.url, "--watch", "0.3",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "lanes" in json.loads(proc.stdout.readline())
        server.stop()
        time.sleep(1.5)
        assert proc.poll() is None  # still watching
        server.start()
        assert "lanes" in json.loads(proc.stdout.readline())  # a snapshot again once Redis answers
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        server.stop()
    assert "Redis did not answer" in err and "trying again" in err and "Traceback" not in err
