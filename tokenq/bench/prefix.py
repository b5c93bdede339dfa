"""`tokenq bench prefix`: what the prefix cache saves. Requests share one long system prompt and differ in
a short tail; the same workload runs on an engine with the prefix cache and on one without.

Two measurements per engine: a burst (every request added at once, from a cold cache, so the first wave
still computes the system prompt) and then sequential requests (one at a time, TTFT of a lone request).
"""

from __future__ import annotations

import argparse

from tokenq.bench import gpu_common as gc


def add_parser(bsub) -> argparse.ArgumentParser:
    return configure(bsub.add_parser("prefix", help="TTFT with the prefix cache on vs off, shared system prompt"))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq.flag_checks import count, natural, output_file

    p.add_argument("--num-requests", type=count, default=256)
    p.add_argument("--system-len", type=natural, default=1024,
                   help="tokens of the system prompt every request shares")
    p.add_argument("--tail-len", type=count, default=64,
                   help="tokens of each request's own tail (also the warm-up requests' length)")
    p.add_argument("--output-len", type=count, default=16)
    p.add_argument("--sequential", type=natural, default=8, help="lone requests timed after the burst")
    p.add_argument("--out", type=output_file, default="bench-prefix.json")
    gc.add_flags(p, max_num_seqs=256, max_num_batched_tokens=8192)
    return p


def _run(setup, cfg, prompts: list[list[int]], lone: list[list[int]], params, vocab: int, warm_len: int) -> dict:
    engine, startup = gc.make_engine(setup, cfg)
    gc.warm_up(engine, vocab, warm_len)
    bm = engine.block_manager
    queried0, hit0 = bm.prefix_queries_tokens, bm.prefix_hit_tokens
    burst, wall = gc.run_timed(engine, prompts, params, tag="burst")
    queried, hit = bm.prefix_queries_tokens - queried0, bm.prefix_hit_tokens - hit0
    singles = []
    for i, p in enumerate(lone):
        (t,), _ = gc.run_timed(engine, [p], params, tag=f"lone{i}")
        singles.append(t)
    gc.free_engine(engine)
    timings = burst + singles
    return {
        "prefix_caching": cfg.enable_prefix_caching,
        "burst": {"seconds": wall, "ttft_ms": gc.stats([t.ttft for t in burst]),
                  "e2e_ms": gc.stats([t.e2e for t in burst]),
                  "prompt_tokens_per_s": sum(len(p) for p in prompts) / wall,
                  "hit_rate": hit / queried if queried else 0.0, "cached_tokens": hit, "prompt_tokens": queried},
        "sequential": {"ttft_ms": gc.stats([t.ttft for t in singles])},
        "engine_startup_s": startup,
        "all_lengths_ok": all(len(t.tokens) == params.max_tokens for t in timings),
    }


def main(args: argparse.Namespace) -> int:
    from protocol.sampling import SamplingParams
    from tokenq.bench.report import machine_info, print_table, write_json

    setup = gc.build_model(args)
    vocab = setup.model_cfg.vocab_size
    system = gc.random_prompts(1, args.system_len, args.system_len, vocab, args.seed)[0]
    n_all = args.num_requests + args.sequential
    tails = gc.random_prompts(n_all, args.tail_len, args.tail_len, vocab, args.seed + 1)
    prompts = [system + t for t in tails]
    burst, lone = prompts[: args.num_requests], prompts[args.num_requests :]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    max_len = args.system_len + args.tail_len + args.output_len
    kv_tokens = len(burst) * max_len
    print(f"{len(burst)} requests sharing a {args.system_len}-token system prompt, each with its own "
          f"{args.tail_len}-token tail, {args.output_len} new tokens; then {len(lone)} lone requests; "
          f"random {setup.shape} model in {setup.dtype} on {setup.device}")

    results = {}
    for on in (True, False):
        cfg = gc.engine_config(args, setup, max_len, kv_tokens, enable_prefix_caching=on)
        results["on" if on else "off"] = _run(setup, cfg, burst, lone, params, vocab, args.tail_len)
    on, off = results["on"], results["off"]
    result = {
        "benchmark": "prefix", "model_shape": setup.shape, "model_config": setup.config,
        "machine": machine_info(),
        "workload": {"num_requests": len(burst), "system_len": args.system_len, "tail_len": args.tail_len,
                     "output_len": args.output_len, "sequential": len(lone), "seed": args.seed},
        "engine_config": vars(gc.engine_config(args, setup, max_len, kv_tokens)),
        "cache_on": on, "cache_off": off,
        "hit_rate": on["burst"]["hit_rate"],
        "speedup_burst_ttft_p50": off["burst"]["ttft_ms"]["p50"] / on["burst"]["ttft_ms"]["p50"],
        "speedup_sequential_ttft_p50": (off["sequential"]["ttft_ms"]["p50"] / on["sequential"]["ttft_ms"]["p50"]
                                        if lone else None),
        "all_lengths_ok": on["all_lengths_ok"] and off["all_lengths_ok"],
    }
    rows = []
    for name, r in (("prefix cache on", on), ("prefix cache off", off)):
        b, s = r["burst"], r["sequential"]["ttft_ms"]
        rows.append([name, b["hit_rate"] * 100, b["ttft_ms"]["p50"], b["ttft_ms"]["p99"], b["seconds"],
                     s.get("p50", float("nan"))])
    print_table("shared system prompt: TTFT (ms)", ["engine", "hit rate %", "burst TTFT p50", "burst TTFT p99",
                                                   "burst seconds", "lone TTFT p50"], rows)
    print(f"\nprefix cache: burst TTFT p50 {_times(result['speedup_burst_ttft_p50'])}"
          + (f", lone request TTFT p50 {_times(result['speedup_sequential_ttft_p50'])}" if lone else ""))
    write_json(args.out, result)
    return 0 if result["all_lengths_ok"] else 1


def _times(speedup: float) -> str:
    """A speed-up said the way it went: "2.50x faster", or "1.18x slower" (a speed-up of 0.85)."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


if __name__ == "__main__":  # without the tokenq CLI (and the service packages it imports)
    gc.standalone(configure, main)
