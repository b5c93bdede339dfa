"""Where the standard throughput load's wall time goes, by kind of step: steps that carry prefill tokens
against decode-only steps (by batch size), on the random model `tokenq bench throughput` runs:

    python tests/gpu/step_kinds.py --model-shape llama3-8b [--quantization fp8 --kv-cache-dtype fp8] [--kernels]

With --kernels the run is repeated under torch.profiler and the GPU time of the whole load is summed by
kernel name (the profiler slows the host, so the first run's step times are the ones to quote).

The engine launches a step before it reads the last one's tokens, so in steady state the wall time between
two `step()` returns is one step's GPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.sampling import SamplingParams  # noqa: E402
from tokenq.bench import gpu_common as gc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    gc.add_flags(p, max_num_seqs=512, max_num_batched_tokens=8192)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--min-prompt-len", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--kernels", action="store_true", help="also sum the load's GPU time by kernel name")
    args = p.parse_args()
    setup = gc.build_model(args)
    vocab = setup.model_cfg.vocab_size
    prompts = gc.random_prompts(args.num_requests, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)
    cfg = gc.engine_config(args, setup, args.max_prompt_len + args.output_len,
                           sum(map(len, prompts)) + len(prompts) * args.output_len)
    engine, _ = gc.make_engine(setup, cfg)
    gc.warm_up(engine, vocab, 128, num=4, new_tokens=8)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    _step_times(engine, prompts, params, args)
    if args.kernels:  # fresh prompts: the first run's would be answered from the prefix cache
        _kernel_totals(engine, gc.random_prompts(args.num_requests, args.min_prompt_len, args.max_prompt_len,
                                                 vocab, args.seed + 1), params)


def _kernel_totals(engine, prompts: list[list[int]], params: SamplingParams) -> None:
    from torch.profiler import ProfilerActivity, profile

    for i, prompt in enumerate(prompts):
        engine.add_request(f"k{i}", prompt, params)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        while engine.has_unfinished_requests():
            engine.step()
    wall = time.perf_counter() - t0
    _idle_gaps(prof, wall)
    totals: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA":
            totals[ev.key[:90]] = [ev.self_device_time_total / 1e3, ev.count]
    whole = sum(r[0] for r in totals.values())
    print(f"\nGPU time of the load by kernel (sum {whole / 1e3:.3f} s):")
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {ms / 1e3:7.3f} s {100 * ms / whole:5.1f}%  {n:7d}x  {name}")


def _idle_gaps(prof, wall: float) -> None:
    """Where the GPU waits: the time between one kernel's end and the next one's start, over the profiled load.
    The profiler slows the host (the wall time printed shows by how much), so a gap here can be the profiler's:
    the first run's step times say what an unprofiled run does."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    if not spans:
        return
    gaps, end = [], spans[0][1]
    for a, b in spans[1:]:
        if a > end:
            gaps.append((a - end, end - spans[0][0]))
        end = max(end, b)
    idle = sum(g for g, _ in gaps) / 1e6
    print(f"\nprofiled load: {wall:.3f} s wall, GPU busy {(end - spans[0][0]) / 1e6 - idle:.3f} s from its first "
          f"kernel to its last, idle {idle:.3f} s between kernels ({sum(g > 50 for g, _ in gaps)} gaps over 50 us)")
    for size, at in sorted(gaps, reverse=True)[:12]:
        print(f"  {size / 1e3:7.2f} ms idle at {at / 1e6:6.3f} s")


def _step_times(engine, prompts: list[list[int]], params: SamplingParams, args: argparse.Namespace) -> None:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    scheduled: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def recording_schedule(*a, **k):
        out = schedule(*a, **k)
        scheduled.update(tokens=out.num_batched_tokens, seqs=len(out.scheduled))
        return out

    engine.scheduler.schedule = recording_schedule
    steps: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    t0 = prev = time.perf_counter()
    while engine.has_unfinished_requests():
        scheduled.clear()
        engine.step()
        now = time.perf_counter()
        tokens, seqs = scheduled.get("tokens", 0), scheduled.get("seqs", 0)
        kind = "no launch" if not seqs else ("decode-only" if tokens == seqs else "with prefill")
        steps[kind].append((now - prev, tokens, seqs))
        prev = now
    wall = time.perf_counter() - t0
    total = args.num_requests * args.output_len
    print(f"{total / wall:,.0f} output tok/s: {wall:.3f} s in {sum(map(len, steps.values()))} steps")
    for kind, rows in steps.items():
        print(f"  {kind:12s} {len(rows):4d} steps, {sum(r[0] for r in rows):6.3f} s, median "
              f"{statistics.median(r[0] for r in rows) * 1e3:7.2f} ms, median {statistics.median(r[2] for r in rows):.0f} "
              f"sequences, {sum(r[1] for r in rows)} tokens")
    top = args.max_num_seqs
    for lo, hi in ((top - 12, top + 1), (top // 2, top - 12), (1, top // 2)):
        times = [r[0] for r in steps["decode-only"] if lo <= r[2] < hi]
        if times:
            print(f"  decode-only at {lo}-{hi - 1} sequences: {len(times)} steps, median "
                  f"{statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
