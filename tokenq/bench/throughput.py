"""`tokenq bench throughput`: offline throughput of our engine against transformers' continuous batching
(`generate_batch`) on the same random-weight model and the same requests.

Every request has a prompt of uniform random length and random tokens and generates exactly --output-len
tokens greedily (no EOS). The peer is slow, so it may run on the first --peer-num-requests requests only;
ours then runs on that same subset too, and the like-for-like ratio is the one on the subset.

With --guided-fraction f, that fraction of the requests is constrained by a JSON schema (tokenq/bench/guided.py)
and may end early, where its grammar ends; the same requests then run again unconstrained with the lengths
the constrained run gave, and the ratio of the two rates is the constraint's cost.
"""

from __future__ import annotations

import argparse
import time

from tokenq.bench import gpu_common as gc


def add_parser(bsub) -> argparse.ArgumentParser:
    help_ = "offline tokens/s on a random-weight model vs transformers' generate_batch"
    return configure(bsub.add_parser("throughput", help=help_))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq.flag_checks import count, fraction, output_file

    p.add_argument("--num-requests", type=count, default=512)
    p.add_argument("--min-prompt-len", type=count, default=64)
    p.add_argument("--max-prompt-len", type=count, default=512)
    p.add_argument("--output-len", type=count, default=256)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--peer-num-requests", type=count, default=None,
                   help="run the peer on the first N requests only (default: all)")
    p.add_argument("--guided-fraction", type=fraction, default=0.0,
                   help="constrain this fraction of the requests by a JSON schema (0 to 1; default 0)")
    p.add_argument("--out", type=output_file, default="bench-throughput.json")
    gc.add_flags(p, max_num_seqs=512, max_num_batched_tokens=8192)
    return p


def _params(output_len: int | list[int], guided: list[bool] | None = None) -> list:
    """Greedy, no EOS, output_len tokens each (or each its own); the `guided` rows under the JSON schema."""
    from protocol.guided import GuidedSpec
    from protocol.sampling import SamplingParams
    from tokenq.bench.guided import EXTRACTION_SCHEMA

    lens = output_len if isinstance(output_len, list) else None
    spec = GuidedSpec(json_schema=EXTRACTION_SCHEMA)
    n = len(lens) if lens is not None else len(guided or [])
    return [SamplingParams(max_tokens=lens[i] if lens is not None else output_len, temperature=0.0, ignore_eos=True,
                           guided=spec if guided and guided[i] else None) for i in range(n)]


def _run_ours(engine, prompts: list[list[int]], output_len: int, device: str,
              params: list | None = None) -> dict:
    params = params or _params(output_len, [False] * len(prompts))
    # Each run starts cold: a rerun of the same prompts would otherwise skip their prefill in the prefix cache.
    engine.block_manager.reset_prefix_cache()
    gc.sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    lengths = [len(o.new_token_ids) for o in outs]
    prompt_tokens = sum(len(p) for p in prompts)
    free = [n for n, p in zip(lengths, params, strict=True) if p.guided is None]
    constrained = [(n, o.finish_reason) for n, o, p in zip(lengths, outs, params, strict=True) if p.guided]
    out = {"num_requests": len(prompts), "seconds": seconds, "prompt_tokens": prompt_tokens,
           "output_tokens": sum(lengths), "output_tokens_per_s": sum(lengths) / seconds,
           "total_tokens_per_s": (sum(lengths) + prompt_tokens) / seconds,
           "all_lengths_ok": all(n == p.max_tokens for n, p in zip(lengths, params, strict=True)
                                 if p.guided is None) and all(r in ("stop", "length") for _, r in constrained),
           "lengths": lengths}
    if constrained:
        out["constrained"] = {"requests": len(constrained), "output_tokens": sum(n for n, _ in constrained),
                              "ended_by_grammar": sum(r == "stop" for _, r in constrained),
                              "unconstrained_output_tokens": sum(free)}
    return out


def main(args: argparse.Namespace) -> int:
    from tokenq.bench.report import machine_info, print_table, write_json
    from worker.models.random_weights import hf_peer

    setup = gc.build_model(args)
    vocab = setup.model_cfg.vocab_size
    prompts = gc.random_prompts(args.num_requests, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)
    peer_n = min(args.peer_num_requests or len(prompts), len(prompts))
    max_len = args.max_prompt_len + args.output_len
    kv_tokens = sum(len(p) for p in prompts) + len(prompts) * args.output_len
    cfg = gc.engine_config(args, setup, max_len, kv_tokens)
    print(f"{len(prompts)} requests, prompts {args.min_prompt_len}-{args.max_prompt_len} random tokens, "
          f"{args.output_len} new tokens each (greedy, no EOS); random {setup.shape} model in {setup.dtype} "
          f"on {setup.device} (built in {setup.seconds_to_build:.1f} s)")

    engine, startup = gc.make_engine(setup, cfg)
    print(f"engine start-up {startup:.1f} s: {engine.runner.num_blocks} KV blocks of {cfg.block_size} tokens "
          f"({engine.runner.kv_dtype}), "
          f"CUDA graphs: {engine.runner.graphs is not None}")
    if engine.runner.memory_profile:
        print("KV cache sized by profiling: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                           engine.runner.memory_profile.items()))
    buckets = gc.graph_buckets(engine)
    gc.warm_up(engine, vocab, min(args.max_prompt_len, 64))
    guided = None
    if args.guided_fraction > 0:
        guided = _prepare_guided(engine, vocab, args)
        rows = guided["rows"]
        ours = _run_ours(engine, prompts, args.output_len, setup.device, _params(args.output_len, rows))
        # The same requests unconstrained, each as long as its constrained run: the cost of the masks alone.
        same = _run_ours(engine, prompts, args.output_len, setup.device, _params(ours["lengths"]))
        guided.update(unconstrained_same_lengths=same,
                      output_tokens_per_s_ratio=ours["output_tokens_per_s"] / same["output_tokens_per_s"])
        print(f"guided: {sum(rows)} of {len(rows)} requests under a JSON schema ({guided['compile_s'] * 1e3:.0f} ms "
              f"to compile); {ours['constrained']['ended_by_grammar']} ended where the grammar ended; output "
              f"tok/s {ours['output_tokens_per_s']:.0f} vs {same['output_tokens_per_s']:.0f} unconstrained "
              f"with the same lengths: {100 * (1 - guided['output_tokens_per_s_ratio']):.1f}% lost")
    else:
        ours = _run_ours(engine, prompts, args.output_len, setup.device)
    ours_subset = None
    if not args.skip_peer and peer_n < len(prompts):
        ours_subset = _run_ours(engine, prompts[:peer_n], args.output_len, setup.device)
    num_blocks, memory = engine.runner.num_blocks, engine.runner.memory_profile
    gc.free_engine(engine)

    result: dict = {
        "benchmark": "throughput", "model_shape": setup.shape, "model_config": setup.config,
        "machine": machine_info(),
        "workload": {"num_requests": len(prompts), "prompt_len": [args.min_prompt_len, args.max_prompt_len],
                     "output_len": args.output_len, "seed": args.seed, "greedy": True, "ignore_eos": True,
                     "detokenize": False},
        "engine_config": vars(cfg) | {"num_kv_blocks": num_blocks},
        "kv_cache_tokens": num_blocks * cfg.block_size,
        "engine_startup_s": startup, "kv_cache_profile": memory, "ours": ours, "graph_buckets": buckets,
    }
    if guided is not None:
        result["workload"]["guided_fraction"] = args.guided_fraction
        result["guided"] = {k: v for k, v in guided.items() if k != "rows"}
    label = f"tokenq ({args.guided_fraction:g} guided)" if guided is not None else "tokenq"
    rows = [[label, ours["num_requests"], ours["output_tokens"], ours["seconds"], ours["output_tokens_per_s"],
             ours["total_tokens_per_s"]]]
    if guided is not None:
        same = guided["unconstrained_same_lengths"]
        rows.append(["tokenq (none guided, same lengths)", same["num_requests"], same["output_tokens"],
                     same["seconds"], same["output_tokens_per_s"], same["total_tokens_per_s"]])
    for run in (ours, ours_subset, guided and guided["unconstrained_same_lengths"]):
        if run:
            run.pop("lengths", None)  # per request: used above, too long for the report
    if ours_subset is not None:
        result["ours_on_peer_subset"] = ours_subset
        rows.append(["tokenq (peer's subset)", peer_n, ours_subset["output_tokens"], ours_subset["seconds"],
                     ours_subset["output_tokens_per_s"], ours_subset["total_tokens_per_s"]])
    if not args.skip_peer:
        hf = hf_peer(setup.model, setup.config)
        peer = gc.peer_generate_batch(hf, prompts[:peer_n], args.output_len)
        peer["subset_of_workload"] = peer_n < len(prompts)
        peer_total = (peer["output_tokens"] + sum(len(p) for p in prompts[:peer_n])) / peer["seconds"]
        rows.append([f"transformers generate_batch ({peer['attn_implementation']})", peer_n,
                     peer["output_tokens"], peer["seconds"], peer["output_tokens_per_s"], peer_total])
        same = ours_subset or ours
        result["peer"] = peer
        result["ratio_output_tokens_per_s"] = same["output_tokens_per_s"] / peer["output_tokens_per_s"]
        result["ratio_basis"] = (f"both on the same first {peer_n} requests" if peer_n < len(prompts)
                                 else "both on all requests")
        if peer_n < len(prompts):
            result["ratio_full_workload_vs_peer_subset"] = ours["output_tokens_per_s"] / peer["output_tokens_per_s"]
    print_table("offline throughput", ["system", "requests", "output tokens", "seconds", "output tok/s",
                                       "total tok/s"], rows)
    if "ratio_output_tokens_per_s" in result:
        print(f"\nratio tokenq / transformers (output tokens/s, {result['ratio_basis']}): "
              f"{result['ratio_output_tokens_per_s']:.2f}x")
        if peer_n < len(prompts):
            print(f"the peer ran on {peer_n} of {len(prompts)} requests (it is slow); tokenq on all "
                  f"{len(prompts)}: {result['ratio_full_workload_vs_peer_subset']:.2f}x the peer's subset rate")
        print(f"peer seconds leave out its set-up and warm-up ({result['peer']['call_seconds']:.1f} s with them)")
    write_json(args.out, result)
    return 0 if ours["all_lengths_ok"] and result.get("peer", {}).get("all_lengths_ok", True) else 1


def _prepare_guided(engine, vocab: int, args: argparse.Namespace) -> dict:
    """Gives a tokenizer-less engine the synthetic vocabulary and compiles the schema before the clock runs."""
    from protocol.guided import GuidedSpec
    from tokenq.bench.guided import EXTRACTION_SCHEMA, constrained_rows, synthetic_guided_decoding

    if engine.guided is None:
        engine.guided = synthetic_guided_decoding(vocab, args.seed)
    t0 = time.perf_counter()
    engine.guided.cache.get(GuidedSpec(json_schema=EXTRACTION_SCHEMA))
    return {"rows": constrained_rows(args.num_requests, args.guided_fraction), "schema": EXTRACTION_SCHEMA,
            "compile_s": time.perf_counter() - t0}


if __name__ == "__main__":  # without the tokenq CLI (and the service packages it imports)
    gc.standalone(configure, main)
