"""`tokenq bench serve` end to end on a CPU: Redis, worker and gateway processes, Poisson clients over
SSE, then the same lone requests on an in-process engine."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("transformers")

from tokenq.bench import serve  # noqa: E402

pytestmark = pytest.mark.slow


def test_serve_bench_small_run(tmp_path, default_model_dir):
    out = tmp_path / "serve.json"
    args = serve.configure(argparse.ArgumentParser()).parse_args(
        ["--model", str(default_model_dir), "--device", "cpu", "--rate", "20", "--num-requests", "6",
         "--prompt-len", "24", "--output-len", "6", "--low-load-requests", "2", "--kv-cache-gb", "0.1",
         "--out", str(out)])
    assert serve.main(args) == 0
    r = json.loads(out.read_text())
    assert r["all_lengths_ok"]
    assert r["loaded"]["num_requests"] == 6 and r["loaded"]["output_tokens"] == 36
    for part in ("loaded", "low_load_gateway", "low_load_direct"):
        assert r[part]["ttft_ms"]["p50"] > 0 and r[part]["e2e_ms"]["p99"] >= r[part]["e2e_ms"]["p50"]
    assert "ttft_overhead_ms_p50" in r
