"""`tokenq bench latency`: one request alone, its time to first token (TTFT) and time per output token
(TPOT), for our engine and for transformers' plain `generate` on the same random-weight model.

Greedy, no EOS, exactly --output-len new tokens; each side is warmed up, then measured --repeats times,
and the medians are reported.
"""

from __future__ import annotations

import argparse
import statistics

from tokenq.bench import gpu_common as gc


def add_parser(bsub) -> argparse.ArgumentParser:
    return configure(bsub.add_parser("latency", help="TTFT and TPOT of one request vs transformers' generate"))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq.flag_checks import count, output_file

    p.add_argument("--prompt-len", type=count, default=128)
    p.add_argument("--output-len", type=count, default=256)
    p.add_argument("--repeats", type=count, default=3)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", type=output_file, default="bench-latency.json")
    gc.add_flags(p, max_num_seqs=8, max_num_batched_tokens=2048)
    return p


def _summary(timings: list[gc.Timing], output_len: int) -> dict:
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {
        "ttft_ms": statistics.median(t.ttft for t in timings) * 1000,
        "tpot_ms": statistics.median(tpots) * 1000 if tpots else None,
        "e2e_ms": statistics.median(t.e2e for t in timings) * 1000,
        "runs_ttft_ms": [t.ttft * 1000 for t in timings],
        "runs_tpot_ms": [t.tpot * 1000 if t.tpot is not None else None for t in timings],
        "all_lengths_ok": all(len(t.tokens) == output_len for t in timings),
    }


def main(args: argparse.Namespace) -> int:
    from protocol.sampling import SamplingParams
    from tokenq.bench.report import machine_info, print_table, write_json
    from worker.models.random_weights import hf_peer

    setup = gc.build_model(args)
    vocab = setup.model_cfg.vocab_size
    prompt = gc.random_prompts(1, args.prompt_len, args.prompt_len, vocab, args.seed)[0]
    max_len = args.prompt_len + args.output_len
    cfg = gc.engine_config(args, setup, max_len, max_len)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    print(f"one request: {args.prompt_len}-token prompt, {args.output_len} new tokens (greedy, no EOS); "
          f"random {setup.shape} model in {setup.dtype} on {setup.device}")

    engine, startup = gc.make_engine(setup, cfg)
    buckets = gc.graph_buckets(engine)
    gc.warm_up(engine, vocab, args.prompt_len, num=1, new_tokens=args.output_len)
    runs = []
    for i in range(args.repeats):
        (t,), _ = gc.run_timed(engine, [prompt], params, tag=f"lat{i}")
        engine.block_manager.reset_prefix_cache()  # every run prefills the whole prompt
        runs.append(t)
    ours = _summary(runs, args.output_len)
    graphs = engine.runner.graphs is not None
    gc.free_engine(engine)

    result: dict = {
        "benchmark": "latency", "model_shape": setup.shape, "model_config": setup.config,
        "machine": machine_info(),
        "workload": {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
                     "seed": args.seed, "greedy": True, "ignore_eos": True},
        "engine_config": vars(cfg), "cuda_graphs": graphs, "gemv": args.gemv, "engine_startup_s": startup, "ours": ours,
        "graph_buckets": buckets,
    }
    if setup.device.startswith("cuda") and ours["tpot_ms"]:
        # The yardstick: every weight read once per token at the bandwidth this card reaches.
        bw, weights = gc.memory_bandwidth(setup.device), gc.weight_bytes(setup.model)
        floor_ms = weights / bw * 1000
        result["floor"] = {"weight_bytes": weights, "copy_bandwidth_bytes_per_s": bw,
                           "weight_read_ms": floor_ms, "tpot_over_weight_read": ours["tpot_ms"] / floor_ms}
        print(f"weights {weights / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s (copy): "
              f"{floor_ms:.2f} ms a token; TPOT is {ours['tpot_ms'] / floor_ms:.3f}x that")
    rows = [["tokenq" + (" (CUDA graphs)" if graphs else ""), ours["ttft_ms"], ours["tpot_ms"], ours["e2e_ms"]]]
    if not args.skip_peer:
        hf = hf_peer(setup.model, setup.config)
        gc.peer_generate_one(hf, prompt, min(args.output_len, 16), setup.device)  # warm-up
        peer_runs = [gc.peer_generate_one(hf, prompt, args.output_len, setup.device) for _ in range(args.repeats)]
        peer = _summary(peer_runs, args.output_len)
        peer.update(attn_implementation=hf.config._attn_implementation, transformers=gc.transformers_version())
        result["peer"] = peer
        result["ratio_tpot"] = peer["tpot_ms"] / ours["tpot_ms"] if ours["tpot_ms"] and peer["tpot_ms"] else None
        result["ratio_ttft"] = peer["ttft_ms"] / ours["ttft_ms"]
        rows.append([f"transformers generate ({peer['attn_implementation']})", peer["ttft_ms"], peer["tpot_ms"],
                     peer["e2e_ms"]])
    print_table("single-request latency (medians, ms)", ["system", "TTFT", "TPOT", "end to end"], rows)
    if result.get("ratio_tpot"):
        print(f"\ntransformers / tokenq: TPOT {result['ratio_tpot']:.2f}x, TTFT {result['ratio_ttft']:.2f}x")
    write_json(args.out, result)
    ok = ours["all_lengths_ok"] and result.get("peer", {}).get("all_lengths_ok", True)
    return 0 if ok else 1


if __name__ == "__main__":  # without the tokenq CLI (and the service packages it imports)
    gc.standalone(configure, main)
