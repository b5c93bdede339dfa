"""docker-compose.yml run the way Docker would run it, without Docker: each service's command and
environment from the file, as real processes on localhost (hostnames and ports mapped to free local
ones). The init steps pull the model and create the first key; a job goes through with keys required,
its webhook arrives signed, and the gateway's one scrape shows the backlog and the other roles' metrics
are served on their ports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, redis_server_binary
from tests.processes import stop_process

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


class Receiver:
    """A webhook endpoint on localhost that keeps every request it gets."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Stack:
    """The compose services as processes: names map to local ports, `redis:6379` to our redis-server."""

    def __init__(self, home: Path, redis_port: int, logs: Path) -> None:
        self.compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        self.home = home
        self.redis_port = redis_port
        self.logs = logs
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, service: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in self.compose[service]["environment"].items():
            env[key] = (str(value).replace("redis://redis:6379", f"redis://127.0.0.1:{self.redis_port}")
                        .replace("/var/lib/tokenq", str(self.home)))  # the image's TOKENQ_HOME, its volumes
        # What the image sets (Dockerfile ENV) and what this test adds: a loopback receiver, quick retries.
        env.update(TOKENQ_HOME=str(self.home), TOKENQ_WEBHOOK_ALLOW="127.0.0.1/32",
                   TOKENQ_WEBHOOK_RETRY_DELAYS="1,1,1", TOKENQ_THROUGHPUT_LOG_S="1")
        return env

    def argv(self, service: str) -> list[str]:
        cmd = list(self.compose[service]["command"])
        assert cmd[0] == "tokenq"
        for flag in ("--port", "--metrics-port"):
            if flag in cmd:
                i = cmd.index(flag) + 1
                self.ports[f"{service}{flag}"] = port = free_port()
                cmd[i] = str(port)
        return [sys.executable, "-m", "tokenq", *cmd[1:]]

    def run_init(self, service: str) -> str:
        done = subprocess.run(self.argv(service), env=self.env(service), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, service: str) -> None:
        log = open(self.logs / f"{service}.log", "w")  # noqa: SIM115 - the process holds it
        self.procs[service] = subprocess.Popen(self.argv(service), env=self.env(service), stdout=log,
                                               stderr=subprocess.STDOUT)

    def log(self, service: str) -> str:
        return (self.logs / f"{service}.log").read_text()


def _wait(what: str, check, stack: Stack, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in stack.procs.items():
            assert p.poll() is None, f"{name} exited:\n{stack.log(name)[-3000:]}"
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(default_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    (home / "models" / default_model_dir.name).symlink_to(default_model_dir)
    data = tmp_path_factory.mktemp("redis")
    redis_cmd = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    port = free_port()
    redis = subprocess.Popen([redis_server_binary(), *redis_cmd[1:], "--port", str(port), "--bind", "127.0.0.1",
                              "--dir", str(data)], stdout=subprocess.DEVNULL)
    s = Stack(home, port, tmp_path_factory.mktemp("logs"))
    try:
        s.init_out = {name: s.run_init(name) for name in ("models", "keys")}
        s.keys_again = s.run_init("keys")
        for name in ("gateway", "worker", "webhooks", "batches"):
            s.start(name)
        s.base = f"http://127.0.0.1:{s.ports['gateway--port']}"
        _wait("gateway health", lambda: httpx.get(f"{s.base}/healthz", timeout=2).status_code == 200, s)
        key = re.search(r"api key:\s+(\S+)", s.init_out["keys"]).group(1)
        auth = {"Authorization": f"Bearer {key}"}
        # Readiness does not wait for workers (jobs may queue without one): the model's listing does.
        _wait("a live worker", lambda: any(m["id"] == MODEL for m in httpx.get(
            f"{s.base}/v1/models", headers=auth, timeout=2).json().get("data", [])), s)
        yield s
    finally:
        codes = {name: stop_process(p) for name, p in s.procs.items()}
        redis.terminate()
        redis.wait(timeout=10)
    assert codes == {name: 0 for name in codes}, codes  # each role drains and exits cleanly on SIGTERM


def test_init_steps_pull_once_and_create_one_key(stack):
    assert "already" in stack.init_out["models"]
    assert re.search(r"api key:\s+\S+", stack.init_out["keys"])
    assert "none created" in stack.keys_again


def test_job_goes_through_with_a_key_and_its_webhook_arrives_signed(stack):
    from standardwebhooks import Webhook

    key = re.search(r"api key:\s+(\S+)", stack.init_out["keys"]).group(1)
    secret = re.search(r"webhook secret:\s+(\S+)", stack.init_out["keys"]).group(1)
    receiver = Receiver()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
            "webhook_url": receiver.url}
    assert httpx.post(f"{stack.base}/v1/jobs", json=body).status_code == 401  # keys are required
    r = httpx.post(f"{stack.base}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    _wait("the webhook", lambda: bool(receiver.got), stack, timeout=120)
    headers, raw = receiver.got[0]
    event = Webhook(secret).verify(raw, headers)  # raises on a bad signature
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
    assert event["data"]["usage"]["completion_tokens"] == 8

    worker = f"http://127.0.0.1:{stack.ports['worker--metrics-port']}/metrics"
    webhooks = f"http://127.0.0.1:{stack.ports['webhooks--metrics-port']}/metrics"
    _wait("the delivery counted", lambda: 'tokenq_webhook_deliveries_total{outcome="delivered"} 1.0'
          in httpx.get(webhooks).text, stack)
    text = httpx.get(worker).text
    assert f'tokenq_worker_e2e_request_latency_seconds_count{{lane="default",model="{MODEL}"}} 1.0' in text
    assert f'tokenq_worker_queue_time_seconds_count{{lane="default",model="{MODEL}",tenant="default"}} 1.0' in text
    # Port 8000 is public: its /metrics asks for the token the gateway made where Prometheus reads it.
    assert httpx.get(f"{stack.base}/metrics").status_code == 401
    token = (stack.home / "secrets" / "metrics-token").read_text().strip()
    gateway = httpx.get(f"{stack.base}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert f'tokenq_live_workers{{model="{MODEL}"}} 1.0' in gateway
    assert f'tokenq_queue_waiting_jobs{{lane="default",model="{MODEL}",tenant="default"}} 0.0' in gateway

    _wait("the access log line", lambda: any(
        line.get("event") == "request" and line.get("path") == "/v1/jobs" and line.get("status") == 202
        for line in _json_lines(stack.log("gateway"))), stack, timeout=10)
    _wait("a throughput line", lambda: any(line.get("event") == "throughput"
                                            for line in _json_lines(stack.log("worker"))), stack, timeout=30)
    assert any(line.get("event") == "kv cache" and line["blocks"] > 0 for line in _json_lines(stack.log("worker")))


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
