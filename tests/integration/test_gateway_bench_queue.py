"""`tokenq bench queue` end to end, small: its own Redis and gateway processes, and the XLEN check that
every job it counts as accepted is on the streams."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_queue_counts_only_what_landed(tmp_path):
    out = tmp_path / "queue.json"
    proc = subprocess.run([sys.executable, "-m", "tokenq", "bench", "queue", "--concurrency", "1,4",
                           "--requests", "60", "--warmup", "10", "--xadd-ops", "10", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "XLEN check: 140 entries on the lane's streams, 140 jobs accepted" in proc.stdout
    result = json.loads(out.read_text())
    assert result["xlen_check"] == {"xlen": 140, "accepted": 140, "ok": True}
    assert result["settings"]["gateway_workers"] == 2
    assert [(run["concurrency"], run["accepted"], run["errors"]) for run in result["gateway"]] == [(1, 60, 0),
                                                                                                 (4, 60, 0)]
    assert all(run["gateway_cpu_us_per_job"] > 0 and run["p50_ms"] > 0 for run in result["gateway"])
