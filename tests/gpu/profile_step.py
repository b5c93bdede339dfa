"""Where one decode step's time goes (batch 1 by default, Llama-3-8B-shaped random bf16 model): the GPU time
of the captured forward alone, of the LM head and sampling, and the host time of each engine stage.

    python tests/gpu/profile_step.py [--model-shape llama3-8b] [--steps 100] [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenq.bench import gpu_common as gc
from tokenq_kernels.sampling import argmax_rows


def _timed(store: dict[str, list[float]], name: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        store.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        return out
    return wrapper


def _gpu_ms(fn, n: int = 50) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    from protocol.sampling import SamplingParams

    p = argparse.ArgumentParser()
    gc.add_flags(p, max_num_seqs=8, max_num_batched_tokens=2048)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    args = p.parse_args()
    args.max_num_seqs = max(args.max_num_seqs, args.batch)
    setup = gc.build_model(args)
    vocab = setup.model_cfg.vocab_size
    cfg = gc.engine_config(args, setup, 512, 512 * args.batch)
    engine, _ = gc.make_engine(setup, cfg)
    gc.warm_up(engine, vocab, 128, num=1, new_tokens=16)
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(gc.random_prompts(args.batch, 128, 128, vocab, 0)):
        engine.add_request(f"p{i}", prompt, params)
    while engine.scheduler.num_waiting or any(s.num_output_tokens == 0 for s in engine.scheduler._running):
        engine.step()  # prefill
    host: dict[str, list[float]] = {}
    runner = engine.runner
    engine.scheduler.schedule = _timed(host, "schedule", engine.scheduler.schedule)
    runner.prepare = _timed(host, "prepare inputs", runner.prepare)
    runner.graphs.run = _timed(host, "graph replay (launch)", runner.graphs.run)
    runner.model.compute_logits = _timed(host, "lm head (launch)", runner.model.compute_logits)
    runner.sampler.sample = _timed(host, "sampler (launch)", runner.sampler.sample)
    # The engine launches step N+1 before it reads step N: this wait is what the host idles on the GPU.
    engine._finish_step = _timed(host, "read the last step's tokens (incl. wait)", engine._finish_step)
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append((time.perf_counter() - t0) * 1e3)
    b = runner.graphs.bucket(args.batch)
    graph_ms = _gpu_ms(lambda: runner.graphs.graphs[b].replay())
    hidden = runner.graphs.hidden[:args.batch]
    head_ms = _gpu_ms(lambda: argmax_rows(runner.model.compute_logits(hidden)))  # the sampler's greedy path
    print(f"decode step at batch {args.batch} (graph bucket {b}), {setup.shape}, {torch.cuda.get_device_name()}")
    print(f"  engine.step wall (median of {args.steps}):       {statistics.median(walls):7.3f} ms")
    print(f"  GPU: captured forward, replay alone:            {graph_ms:7.3f} ms")
    print(f"  GPU: LM head + argmax:                          {head_ms:7.3f} ms")
    print(f"  GPU busy (forward + head over step wall):       {(graph_ms + head_ms) / statistics.median(walls):7.1%}")
    for name, v in host.items():
        print(f"  host: {name:40s} {statistics.median(v):7.3f} ms")
    # Per-kernel GPU time of the same decode forward run eagerly (the graph replays these kernels).
    from torch.profiler import ProfilerActivity, profile

    runner.graphs._forward(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.graphs._forward(b)
            argmax_rows(runner.model.compute_logits(hidden))
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows) / 10 / 1e3
    print(f"\nGPU kernels of one eager decode step incl. LM head (sum {total:.3f} ms; per step):")
    for e in rows[:14]:
        if e.self_device_time_total:
            print(f"  {e.self_device_time_total / 10 / 1e3:7.3f} ms  {e.count // 10:4d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
