"""`tokenq bench serve` end to end on a CPU: Redis, worker and gateway processes, Poisson clients over
SSE, then the same lone requests on an in-process engine."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("transformers")

from tokenq.bench import serve  # noqa: E402
from tokenq.bench.launch import launch  # noqa: E402

pytestmark = pytest.mark.slow


def _check(r: dict, n: int, output_len: int, rates: list[float]) -> None:
    assert r["all_lengths_ok"]
    assert [p["rate"] for p in r["phases"]] == rates
    for phase in r["phases"]:
        assert phase["num_requests"] == n and phase["output_tokens"] == n * output_len
        # Read from the worker's metrics: the engine process's blocked sends, a part of the phase at most.
        assert isinstance(phase["engine_report_send_s"], float)
        assert 0 <= phase["engine_report_send_s"] < phase["seconds"]
        # What the engine launched for the phase: every prompt token and every output token but each last.
        prompts = phase["step_tokens"] - n * (output_len - 1)
        assert prompts >= n * r["workload"]["min_prompt_len"], phase
        assert phase["steps"] >= output_len and 1 <= phase["prefill_steps"] <= phase["steps"]
    parts = [*r["phases"], r["low_load_gateway"], r["low_load_direct"], r["low_load_direct_back_to_back"],
             r["offline"]]
    for part in parts:
        assert part["ttft_ms"]["p50"] > 0 and part["e2e_ms"]["p99"] >= part["e2e_ms"]["p50"]
    assert r["offline"]["output_tokens"] == n * output_len
    top = max(r["phases"], key=lambda p: p["rate"])
    assert r["offline"]["step_tokens"] == top["step_tokens"]  # the same requests: the same tokens computed
    assert r["served_over_offline"] == pytest.approx(top["output_tokens_per_s"] / r["offline"]["output_tokens_per_s"])
    assert "ttft_overhead_ms_p50" in r
    each = r["low_load_ttft_ms_each"]
    assert r["ttft_overhead_ms_paired_p50"] == pytest.approx(
        statistics.median(g - d for g, d in zip(each["gateway"], each["direct"], strict=True)))
    assert r["ttft_overhead_ms_paired_p50_vs_back_to_back"] == pytest.approx(
        statistics.median(g - d for g, d in zip(each["gateway"], each["direct_back_to_back"], strict=True)))
    # The lone-request rows, served and direct, count the same seconds: each request's own, the pauses left out.
    for part in ("low_load_gateway", "low_load_direct", "low_load_direct_back_to_back"):
        row = r[part]
        assert row["seconds"] == pytest.approx(row["num_requests"] * row["e2e_ms"]["mean"] / 1000), part
    # The client against a server that answers at once: a floor under every served TTFT above.
    assert 0 < r["client_floor_ttft_ms"]["p50"] < r["low_load_gateway"]["ttft_ms"]["p50"]
    hops = r["low_load_ttft_hops_ms_p50"]  # one wall clock: each hop of a lone request takes some time
    assert list(hops) == ["send_to_created", "created_to_started", "started_to_first_token",
                          "first_token_to_client"]
    assert all(v > 0 for v in hops.values()), hops
    started_to_first = r["low_load_ttft_hops_ms_each"]["started_to_first_token"]
    assert len(started_to_first) == len(each["direct"])  # every lone request traced: paired by position
    assert r["engine_extra_ms_paired_p50"] == pytest.approx(
        statistics.median(s - d for s, d in zip(started_to_first, each["direct"], strict=True)))


def test_serve_bench_small_run(tmp_path, default_model_dir, monkeypatch):
    monkeypatch.delenv("TOKENQ_HOT_LOOP", raising=False)
    out = tmp_path / "serve.json"
    args = serve.configure(argparse.ArgumentParser()).parse_args(
        ["--model", str(default_model_dir), "--device", "cpu", "--rate", "20", "--num-requests", "6",
         "--min-prompt-len", "24", "--output-len", "6", "--low-load-requests", "2", "--kv-cache-gb", "0.1", "--max-model-len", "512",
         "--client-procs", "2", "--out", str(out)])
    assert launch("serve", serve.main, args) == 0
    assert not args.workdir.exists()  # a run that succeeds leaves no folder behind
    r = json.loads(out.read_text())
    _check(r, 6, 6, [20.0])
    assert r["workload"]["hot_loop"] is False  # as `tokenq up` runs a CPU engine: the stack sleeps between tokens


def test_serve_bench_random_shape_two_phases(tmp_path):
    """A random-weight model of a named shape, served without any download; a Poisson phase and an
    all-at-once phase; the offline reference runs the all-at-once phase's requests."""
    out = tmp_path / "serve.json"
    args = serve.configure(argparse.ArgumentParser()).parse_args(
        ["--model-shape", "tiny", "--device", "cpu", "--rate", "50", "inf", "--num-requests", "8",
         "--min-prompt-len", "8", "--max-prompt-len", "40", "--output-len", "5", "--low-load-requests", "2",
         "--low-load-output-len", "3", "--kv-cache-gb", "0.05", "--client-procs", "2", "--out", str(out)])
    assert launch("serve", serve.main, args) == 0
    assert not args.workdir.exists()  # a run that succeeds leaves no folder behind
    r = json.loads(out.read_text())
    _check(r, 8, 5, [50.0, float("inf")])
    assert r["model"] == "random-tiny" and r["offline"]["num_requests"] == 8
    for part in ("low_load_gateway", "low_load_direct", "low_load_direct_back_to_back"):  # 3 tokens each
        assert r[part]["output_tokens"] == 2 * 3, part
