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
    # Both submission paths ran, on the same Redis: 2 x (10 warm-up + 60) jobs each.
    assert "XLEN check: 280 entries on the lane's streams, 280 jobs accepted" in proc.stdout
    result = json.loads(out.read_text())
    assert result["xlen_check"] == {"xlen": 280, "accepted": 280, "ok": True}
    assert result["settings"]["gateway_workers"] == 2
    assert [(run["path"], run["concurrency"], run["accepted"], run["errors"]) for run in result["gateway"]] == [
        ("hand-written", 1, 60, 0), ("hand-written", 4, 60, 0), ("library", 1, 60, 0), ("library", 4, 60, 0)]
    assert "hand-written path: x" in result["paths"]["verdict"] and "verdict" not in proc.stderr
    assert all(run["gateway_cpu_us_per_job"] > 0 and run["p50_ms"] > 0 for run in result["gateway"])
