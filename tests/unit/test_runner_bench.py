"""The random-weight benchmarks as CPU smoke tests on the tiny shape: each writes its JSON with the fields
a reader relies on, and every request produced the requested number of tokens."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tokenq.bench import latency, prefix, throughput  # noqa: E402
from tokenq.bench.launch import launch  # noqa: E402

TINY = ["--model-shape", "tiny", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(module, argv: list[str], tmp_path) -> dict:
    out = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}.json"
    args = module.configure(__import__("argparse").ArgumentParser()).parse_args([*argv, *TINY, "--out", str(out)])
    assert launch(module.__name__.rsplit(".", 1)[-1], module.main, args) == 0
    return json.loads(out.read_text())


def test_throughput_with_peer_on_a_subset(tmp_path):
    r = _run(throughput, ["--num-requests", "12", "--min-prompt-len", "8", "--max-prompt-len", "40",
                          "--output-len", "10", "--peer-num-requests", "4"], tmp_path)
    assert r["benchmark"] == "throughput" and r["model_shape"] == "tiny"
    assert r["ours"]["num_requests"] == 12 and r["ours"]["output_tokens"] == 120
    assert r["ours"]["all_lengths_ok"] and r["ours"]["output_tokens_per_s"] > 0
    assert r["ours_on_peer_subset"]["num_requests"] == 4
    peer = r["peer"]
    assert peer["num_requests"] == 4 and peer["subset_of_workload"] and peer["all_lengths_ok"]
    assert peer["output_tokens"] == 40
    assert r["ratio_output_tokens_per_s"] > 0 and "first 4 requests" in r["ratio_basis"]
    assert {"machine", "workload", "engine_config", "engine_startup_s"} <= r.keys()


def test_latency(tmp_path):
    r = _run(latency, ["--prompt-len", "16", "--output-len", "12", "--repeats", "2"], tmp_path)
    for side in ("ours", "peer"):
        assert r[side]["all_lengths_ok"]
        assert r[side]["ttft_ms"] > 0 and r[side]["tpot_ms"] > 0 and len(r[side]["runs_ttft_ms"]) == 2
    assert r["cuda_graphs"] is False and r["ratio_tpot"] > 0


def test_prefix(tmp_path):
    r = _run(prefix, ["--num-requests", "10", "--system-len", "64", "--tail-len", "8", "--output-len", "3",
                      "--sequential", "2", "--block-size", "8", "--max-num-batched-tokens", "128"], tmp_path)
    assert r["all_lengths_ok"]
    on, off = r["cache_on"], r["cache_off"]
    assert on["prefix_caching"] and not off["prefix_caching"]
    assert off["burst"]["hit_rate"] == 0.0
    # Requests admitted after the first wave find the 64-token system prompt (8 blocks of 8) cached.
    assert 0.3 < on["burst"]["hit_rate"] <= 64 / 72
    assert on["burst"]["ttft_ms"]["p50"] > 0 and on["sequential"]["ttft_ms"]["p50"] > 0
    assert r["hit_rate"] == on["burst"]["hit_rate"] and r["speedup_burst_ttft_p50"] > 0


def test_graph_buckets_report_names_the_dropped_buckets(capsys):
    from types import SimpleNamespace

    from tokenq.bench import gpu_common

    runner = SimpleNamespace(graph_sets={"decode": SimpleNamespace(times={8: 4.0, 16: 5.0, 24: 4.5}, sizes=[8, 24])})
    report = gpu_common.graph_buckets(SimpleNamespace(runner=runner))
    assert report == {"decode": {"times_ms": {8: 4.0, 16: 5.0, 24: 4.5}, "kept": [8, 24]}}
    assert "decode 16 (5.00 ms)" in capsys.readouterr().out
    cpu = SimpleNamespace(graph_sets={})  # nothing captured, nothing timed
    assert gpu_common.graph_buckets(SimpleNamespace(runner=cpu)) == {}


def test_a_speedup_below_one_is_said_as_slower():
    assert prefix._times(2.5) == "2.50x faster" and prefix._times(1.0) == "1.00x faster"
    assert prefix._times(0.85) == "1.18x slower"
