"""`tokenq bench serve`: the whole path (HTTP gateway, Redis stream, worker, pub/sub, SSE) under Poisson
arrivals, with TTFT, TPOT and end-to-end latency percentiles and the throughput seen by clients.

Redis (embedded unless --redis-url), `tokenq worker` and `tokenq gateway` run as subprocesses, the way
`tokenq up` runs them; the clients stream /v1/completions with token-id prompts and ignore_eos, so every
request generates exactly --output-len tokens. At low load (one request at a time) the same prompts then
run on an in-process engine, and the difference of the TTFTs is what the queue path adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenq.bench import gpu_common as gc
from tokenq.supervisor import stop_children


def add_parser(bsub) -> argparse.ArgumentParser:
    return configure(bsub.add_parser("serve", help="gateway + Redis + worker under Poisson arrivals"))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq import settings

    p.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    p.add_argument("--redis-url", default=None, help="default: an embedded Redis of its own")
    p.add_argument("--device", default="auto")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals, requests per second")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--low-load-requests", type=int, default=8, help="sequential requests, both paths")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size on CPU")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-serve.json")
    return p


# ---- the client side ----------------------------------------------------------------------------------


async def _stream_one(client, base: str, model: str, prompt: list[int], output_len: int) -> gc.Timing:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t = gc.Timing(added=time.perf_counter())
    last = None
    completion_tokens = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if any(c.get("text") for c in chunk.get("choices", [])):
                t.first = t.first or now
                last = now
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    t.done = last or time.perf_counter()
    t.first = t.first or t.done
    t.tokens = [0] * completion_tokens  # counts only: the text is not kept
    return t


async def _drive(base: str, model: str, prompts: list[list[int]], output_len: int,
                 arrivals: list[float] | None) -> tuple[list[gc.Timing], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if arrivals is None:  # one at a time
            out = [await _stream_one(client, base, model, p, output_len) for p in prompts]
            return out, time.perf_counter() - t0

        async def later(delay: float, p: list[int]) -> gc.Timing:
            await asyncio.sleep(max(0.0, delay - (time.perf_counter() - t0)))
            return await _stream_one(client, base, model, p, output_len)

        out = await asyncio.gather(*(later(a, p) for a, p in zip(arrivals, prompts, strict=True)))
        return list(out), time.perf_counter() - t0


# ---- the server side ----------------------------------------------------------------------------------


def _start_stack(args: argparse.Namespace, model: str, device: str, workdir: Path):
    from tokenq.embedded_redis import EmbeddedRedis, free_port
    from tokenq.supervisor import _wait_ready

    redis = None if args.redis_url else EmbeddedRedis(workdir / "redis").start()
    url = args.redis_url or redis.url
    port = free_port()
    env = {**os.environ, "TOKENQ_REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    worker_args = ["--model", model, "--device", device, "--max-num-seqs", str(args.max_num_seqs),
                   "--kv-cache-gb", str(args.kv_cache_gb), *(["--enforce-eager"] if args.enforce_eager else [])]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tokenq", "worker", *worker_args], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(workdir / "worker.log", "wb")),
        subprocess.Popen([sys.executable, "-m", "tokenq", "gateway", "--port", str(port)], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(workdir / "gateway.log", "wb")),
    ]
    base = f"http://127.0.0.1:{port}"
    if not _wait_ready(f"{base}/readyz", procs, timeout=600):
        _stop_stack(procs, redis)
        raise RuntimeError(f"the stack did not become ready; logs in {workdir}")
    return base, procs, redis


def _stop_stack(procs: list[subprocess.Popen], redis) -> None:
    stop_children(procs)
    if redis is not None:
        redis.stop()


def _direct_ttfts(path: Path, args: argparse.Namespace, device: str, prompts: list[list[int]]) -> list[gc.Timing]:
    """The same lone requests on an engine in this process: no HTTP, no Redis."""
    from protocol.sampling import SamplingParams
    from worker.engine.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    cfg = EngineConfig(device=device, dtype="bfloat16" if device.startswith("cuda") else "float32",
                       max_num_seqs=args.max_num_seqs, kv_cache_memory_gb=args.kv_cache_gb,
                       enforce_eager=True if args.enforce_eager else None)
    engine = LLMEngine(path, cfg)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], params)  # warm-up
    engine.block_manager.reset_prefix_cache()
    out = []
    for i, p in enumerate(prompts):
        (t,), _ = gc.run_timed(engine, [p], params, tag=f"direct{i}")
        engine.block_manager.reset_prefix_cache()
        out.append(t)
    gc.free_engine(engine)
    return out


def _summary(timings: list[gc.Timing], wall: float) -> dict:
    tokens = sum(len(t.tokens) for t in timings)
    return {"num_requests": len(timings), "seconds": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(timings) / wall,
            "ttft_ms": gc.stats([t.ttft for t in timings]),
            "tpot_ms": gc.stats([t.tpot for t in timings if t.tpot is not None]),
            "e2e_ms": gc.stats([t.e2e for t in timings])}


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenq.bench.report import machine_info, print_table, write_json
    from tokenq.model_store import resolve_model
    from worker.models.config import ModelConfig

    name, path = resolve_model(args.model)
    device = gc.resolve_device(args.device)
    vocab = ModelConfig.from_dir(path).vocab_size
    n_low = args.low_load_requests
    prompts = gc.random_prompts(args.num_requests + n_low + 2, args.prompt_len, args.prompt_len, vocab,
                                args.seed)
    warm, low, loaded = prompts[:2], prompts[2 : 2 + n_low], prompts[2 + n_low :]
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=len(loaded))).tolist()
    print(f"{len(loaded)} requests at {args.rate}/s (Poisson), {args.prompt_len}-token prompts, "
          f"{args.output_len} new tokens each; model {name} on {device}")

    workdir = Path(tempfile.mkdtemp(prefix="tokenq-bench-serve-"))
    base, procs, redis = _start_stack(args, name, device, workdir)
    try:
        asyncio.run(_drive(base, name, warm, args.output_len, None))
        low_t, low_wall = asyncio.run(_drive(base, name, low, args.output_len, None))
        load_t, load_wall = asyncio.run(_drive(base, name, loaded, args.output_len, arrivals))
    finally:
        _stop_stack(procs, redis)
    direct_t = _direct_ttfts(path, args, device, low)

    gateway_low, direct = _summary(low_t, low_wall), _summary(direct_t, sum(t.e2e for t in direct_t))
    result = {
        "benchmark": "serve", "model": name, "machine": machine_info(),
        "workload": {"rate": args.rate, "num_requests": len(loaded), "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "low_load_requests": n_low, "seed": args.seed},
        "loaded": _summary(load_t, load_wall), "low_load_gateway": gateway_low, "low_load_direct": direct,
        "ttft_overhead_ms_p50": gateway_low["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"],
        "all_lengths_ok": all(len(t.tokens) == args.output_len for t in low_t + load_t + direct_t),
    }
    rows = []
    for label, s in (("Poisson load, via gateway", result["loaded"]), ("one at a time, via gateway", gateway_low),
                     ("one at a time, engine direct", direct)):
        rows.append([label, s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["tpot_ms"].get("p50", 0.0),
                     s["tpot_ms"].get("p99", 0.0), s["e2e_ms"]["p50"], s["e2e_ms"]["p99"],
                     s["output_tokens_per_s"]])
    print_table("serving latency (ms) and throughput", ["path", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                                                        "e2e p50", "e2e p99", "output tok/s"], rows)
    print(f"\nthe queue path adds {result['ttft_overhead_ms_p50']:.1f} ms to TTFT at low load (p50)")
    write_json(args.out, result)
    return 0 if result["all_lengths_ok"] else 1


if __name__ == "__main__":
    gc.standalone(configure, main)
