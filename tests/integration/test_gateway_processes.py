"""Several gateway processes on one port (TOKENQ_GATEWAY_WORKERS=2): a scrape that lands on either reads
the counters of both, so totals never go backwards between scrapes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port
from tests.processes import stop_process

HITS = 30
SCRAPES = 8


def _healthz_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("tokenq_gateway_requests_total{") and 'route="/healthz"' in line \
                and 'status="200"' in line:
            return float(line.split()[-1])
    return 0.0


def test_every_scrape_counts_the_requests_of_every_process(redis_url, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENQ_GATEWAY_WORKERS": "2"}
    env.pop("TOKENQ_REDIS_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "gateway.log"
    proc = subprocess.Popen([sys.executable, "-m", "tokenq", "gateway", "--redis-url", redis_url,
                             "--port", str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        for _ in range(HITS):  # a connection each, so that both processes take some
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        counts = [_healthz_count(httpx.get(f"{base}/metrics", timeout=10).text) for _ in range(SCRAPES)]
        assert counts == [HITS] * SCRAPES, counts
        body = httpx.get(f"{base}/metrics", timeout=10).text
        assert body.count("# TYPE tokenq_queue_waiting_jobs gauge") == 1
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
