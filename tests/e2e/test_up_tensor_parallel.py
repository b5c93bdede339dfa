"""`tokenq up --tensor-parallel-size 2` on the CPU: the greedy tokens of the default model (float32) through
the whole served path (gateway, Redis, worker, engine process and its second gloo rank) equal those of one
rank. The issue's full check is 20 prompts x 32 tokens:

    TOKENQ_TP_PARITY_PROMPTS=20 pytest -m slow tests/e2e/test_up_tensor_parallel.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
NUM_PROMPTS = int(os.environ.get("TOKENQ_TP_PARITY_PROMPTS") or 6)
MAX_TOKENS = 32
TOPICS = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "chess", "the moon", "trains",
          "gardens", "music", "winter", "bees", "rivers", "a market", "clocks", "bridges", "owls", "tea", "maps"]


def chat_tokens(base: str, topic: str) -> list[str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return [t["token"] for t in choice["logprobs"]["content"]] if choice.get("logprobs") else [
        choice["message"]["content"]]


def served_tokens(default_model_dir, home, tp: int) -> list[list[str]]:
    (home / "models").mkdir(exist_ok=True)
    link = home / "models" / default_model_dir.name
    if not link.exists():
        link.symlink_to(default_model_dir)
    port, worker_metrics, webhooks_metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "TOKENQ_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("TOKENQ_REDIS_URL", None)
    log_path = home / f"up-tp{tp}.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tokenq", "up", "--port", str(port), "--kv-cache-gb", "0.5",
                                 "--tensor-parallel-size", str(tp), "--worker-metrics-port", str(worker_metrics),
                                 "--webhooks-metrics-port", str(webhooks_metrics),
                                 "--batches-metrics-port", str(free_port())], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "never ready:\n" + log_path.read_text()
                try:  # ready, and its worker has registered the model
                    models = httpx.get(f"{base}/v1/models", timeout=1)
                    if models.status_code == 200 and MODEL in {m["id"] for m in models.json()["data"]}:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.5)
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda t: chat_tokens(base, t), TOPICS[:NUM_PROMPTS]))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_tp2_tokens_equal_tp1_through_tokenq_up(default_model_dir, tmp_path):
    one = served_tokens(default_model_dir, tmp_path, tp=1)
    two = served_tokens(default_model_dir, tmp_path, tp=2)
    assert all(len(t) == MAX_TOKENS for t in one), [len(t) for t in one]
    same = sum(a == b for a, b in zip(one, two, strict=True))
    assert same == len(one), f"{same} of {len(one)} prompts gave the same {MAX_TOKENS} tokens"
