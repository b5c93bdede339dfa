"""Each role's process, as `tokenq up` starts it, writes lines that name it (`role`) and follow
TOKENQ_LOG_LEVEL: the gateway's own lines and uvicorn's, the batch feeder's, the deliverer's, the worker's
and its engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.processes import stop_process


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from worker.models.random_weights import write_random_model_dir

    return write_random_model_dir("tiny", tmp_path_factory.mktemp("tiny"))


def _run(argv: list[str], log: Path, level: str | None, until: Callable[[], bool], timeout: float = 120) -> list[dict]:
    """Start `tokenq ARGV` (stderr to `log`, no terminal), wait for `until()`, stop it with SIGTERM as `tokenq up`
    does, and return its JSON lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TOKENQ_LOG_LEVEL", None)
    if level is not None:
        env["TOKENQ_LOG_LEVEL"] = level
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tokenq", *argv], env=env, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _logged(log: Path, event: str) -> Callable[[], bool]:
    return lambda: log.exists() and f'"event": "{event}"' in log.read_text()


def _answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


@pytest.mark.parametrize("level, workers", [("DEBUG", "1"), ("WARNING", "1"), ("DEBUG", "2")])
def test_the_gateway_and_uvicorn_name_the_gateway_at_the_level(redis_url, tmp_path, monkeypatch, level, workers):
    """A health probe's access line is a debug line: shown at DEBUG, with uvicorn's own lines; several gateway
    processes on one port log alike."""
    monkeypatch.setenv("TOKENQ_GATEWAY_WORKERS", workers)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    lines = _run(["gateway", "--redis-url", redis_url, "--port", str(port)], tmp_path / "gateway.log", level,
                 _answers(f"{base}/healthz"))
    if level == "DEBUG":
        probes = [line for line in lines if line["event"] == "request" and line["path"] == "/healthz"]
        assert probes and probes[0]["level"] == "debug" and probes[0]["component"] == "access"
        assert "Application startup complete." in {line["event"] for line in lines}
        assert all(line["role"] == "gateway" for line in lines)
    else:
        assert [line for line in lines if line["level"] in ("debug", "info")] == []


@pytest.mark.parametrize("level", [None, "WARNING"])
def test_the_batch_feeder_names_itself_at_the_level(redis_url, tmp_path, level):
    """Started, then stopped with SIGTERM (exit 0: it had logged its start, shown or not)."""
    log = tmp_path / "batches.log"
    started = time.monotonic()
    lines = _run(["batches", "--redis-url", redis_url], log, level,
                 _logged(log, "batch feeder started") if level is None else lambda: time.monotonic() > started + 5)
    if level is None:
        assert {"batch feeder started", "batch feeder stopped"} <= {line["event"] for line in lines}
        assert all(line["role"] == "batches" for line in lines)
    else:
        assert [line for line in lines if line["level"] in ("debug", "info")] == []


def test_the_webhook_deliverer_names_itself(redis_url, tmp_path):
    log = tmp_path / "webhooks.log"
    lines = _run(["webhooks", "--redis-url", redis_url, "--metrics-port", str(free_port())], log, None,
                 _logged(log, "webhook service started"))
    assert "webhook service started" in {line["event"] for line in lines}
    assert all(line["role"] == "webhooks" for line in lines)


def test_the_worker_and_its_engine_name_themselves(redis_url, tmp_path, tiny_model_dir):
    log = tmp_path / "worker.log"
    lines = _run(["worker", "--redis-url", redis_url, "--model", str(tiny_model_dir), "--max-model-len", "512",
                  "--device", "cpu", "--metrics-port", str(free_port())], log, None, _logged(log, "worker starting"),
                 timeout=180)
    roles = {line["event"]: line["role"] for line in lines}
    assert (roles["model loaded"], roles["worker starting"]) == ("engine", "worker")
    assert {line["role"] for line in lines} == {"engine", "worker"}
