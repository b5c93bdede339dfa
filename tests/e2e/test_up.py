"""`tokenq up` as a user runs it: real processes, an embedded Redis, HTTP from outside, Ctrl-C at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis as redis_client

from protocol import job_record as F
from protocol.keys import job_key
from tests.conftest import free_port
from tokenq.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.slow

UP_PORTS: dict[str, int] = {}
DRAIN_GRACE_S = 3  # the worker's drain: how long a running job may still finish after Ctrl-C


def _env(home) -> dict[str, str]:
    env = {**os.environ, "TOKENQ_HOME": str(home)}
    env.pop("TOKENQ_REDIS_URL", None)
    return env


def _children(proc: subprocess.Popen) -> dict[int, str]:
    """pid -> command line of each child of `tokenq up`."""
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    out = {}
    for pid in pids:
        try:
            out[int(pid)] = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def tokenq_up(default_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    (home / "models" / default_model_dir.name).symlink_to(default_model_dir)
    port, worker_metrics, webhooks_metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "TOKENQ_HOME": str(home), "PYTHONUNBUFFERED": "1", "TOKENQ_DRAIN_GRACE_S": str(DRAIN_GRACE_S)}
    env.pop("TOKENQ_REDIS_URL", None)
    log = open(home / "up.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tokenq", "up", "--port", str(port), "--max-num-seqs", "3",
                             "--kv-cache-gb", "0.4", "--worker-metrics-port", str(worker_metrics),
                             "--webhooks-metrics-port", str(webhooks_metrics),
                             "--batches-metrics-port", str(free_port())], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (home / "up.log").read_text()
        try:
            r = httpx.get(f"{base}/readyz", timeout=1)
            if r.status_code == 200 and r.json().get("workers", 0) > 0:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("tokenq up never became ready:\n" + (home / "up.log").read_text())
    UP_PORTS.update(worker=worker_metrics, webhooks=webhooks_metrics)
    yield base, proc, home
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_prints_url_and_curl_example(tokenq_up):
    base, _, home = tokenq_up
    deadline = time.monotonic() + 10
    while "curl" not in (home / "up.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = (home / "up.log").read_text()
    assert base in text and "curl" in text
    password = (home / "redis" / "address").read_text().split("@")[0].rsplit(":", 1)[1]
    assert "embedded Redis on redis://default:***@127.0.0.1:" in text and password not in text  # the log keeps no secret


def test_openai_client_chat_and_stream(tokenq_up):
    from openai import OpenAI

    base, _, _ = tokenq_up
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=20,
                                           temperature=0)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.usage.completion_tokens > 0
    chunks = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=20,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_job_lifecycle_and_models(tokenq_up):
    base, _, _ = tokenq_up
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    r = httpx.post(f"{base}/v1/jobs", json={"model": "smollm2-135m-instruct", "prompt": "Once upon a time",
                                            "max_tokens": 16, "temperature": 0, "priority": "batch",
                                            "metadata": {"k": "v"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["metadata"] == {"k": "v"}
    assert job["result"]["usage"]["completion_tokens"] == 16


def test_unknown_model_is_404_with_openai_error(tokenq_up):
    base, _, _ = tokenq_up
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert "error" in r.json() and "nope" in json.dumps(r.json())


def test_one_scrape_shows_every_role(tokenq_up):
    base, _, _ = tokenq_up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics").text
        if 'role="worker"' in text and 'role="webhooks"' in text:
            break
        time.sleep(0.5)
    assert "tokenq_gateway_requests_total" in text and "tokenq_live_workers" in text
    assert 'tokenq_worker_kv_cache_usage_ratio{model="smollm2-135m-instruct",role="worker"}' in text
    assert 'role="webhooks"' in text
def test_worker_gets_the_engine_options(tokenq_up):
    _, proc, _ = tokenq_up
    [worker] = [c for c in _children(proc).values() if " worker " in c]
    assert "--max-num-seqs 3" in worker and "--kv-cache-gb 0.4" in worker


def test_other_commands_find_the_embedded_redis(tokenq_up):
    _, _, home = tokenq_up
    listed = subprocess.run([sys.executable, "-m", "tokenq", "keys", "list"], env=_env(home), capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("id\ttenant")


def test_a_second_up_on_the_same_home_is_refused(tokenq_up):
    base, _, home = tokenq_up
    second = subprocess.run([sys.executable, "-m", "tokenq", "up", "--port", str(free_port())], env=_env(home),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "already running" in second.stderr and base in second.stderr
    assert "embedded Redis" not in second.stdout  # refused before it started anything
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def test_the_engine_process_logs_json_lines_as_the_other_roles_do(tokenq_up):
    """Log shippers parse one JSON object a line; the engine process, spawned, began with structlog's console
    format."""
    _, _, home = tokenq_up
    events = [json.loads(line) for line in (home / "up.log").read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "model loaded" and e["component"] == "engine_process" for e in events)


def test_worker_and_webhook_metrics_are_served(tokenq_up):
    worker = httpx.get(f"http://127.0.0.1:{UP_PORTS['worker']}/metrics", timeout=10).text
    webhooks = httpx.get(f"http://127.0.0.1:{UP_PORTS['webhooks']}/metrics", timeout=10).text
    assert "tokenq_worker" in worker
    assert "tokenq_webhook" in webhooks


def test_a_child_that_dies_is_started_again(tokenq_up):
    base, proc, home = tokenq_up
    [(old, _)] = [(pid, c) for pid, c in _children(proc).items() if " webhooks " in c]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    new = []
    while time.monotonic() < deadline and not new:
        new = [pid for pid, c in _children(proc).items() if " webhooks " in c and pid != old]
        time.sleep(0.2)
    assert new, (home / "up.log").read_text()[-3000:]
    assert proc.poll() is None
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def test_ctrl_c_in_a_terminal_drains_the_worker_before_redis_stops(tokenq_up):
    """A terminal's Ctrl-C is a SIGINT to the whole foreground process group (the fixture's session). Only
    `tokenq up` may take it: Redis must outlive the worker's drain, which hands a running job back."""
    base, proc, home = tokenq_up
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2  # worker and gateway (and the embedded redis-server)
    job_id = httpx.post(f"{base}/v1/jobs", json={"model": "smollm2-135m-instruct", "prompt": "Once upon a time",
                                                  "max_tokens": 4000, "ignore_eos": True}).json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 0, (home / "up.log").read_text()[-3000:]
    assert time.monotonic() - signalled >= DRAIN_GRACE_S  # one Ctrl-C: the worker's grace was not cut short
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    log = (home / "up.log").read_text()
    assert "could not hand unfinished jobs back" not in log and "handed unfinished jobs back" in log, log[-3000:]
    assert (home / "redis" / "appendonlydir").exists() or list((home / "redis").glob("*.aof"))
    redis = EmbeddedRedis(home / "redis").start()  # what the drain wrote is in the append-only file
    try:
        record = redis_client.Redis.from_url(redis.url, decode_responses=True).hgetall(job_key(job_id))
        assert record[F.STATE] == "queued", record  # handed back (a worker that lost Redis first left it running)
    finally:
        redis.stop()