"""`tokenq bench serve`: the whole path (HTTP gateway, Redis stream, worker, pub/sub, SSE) under Poisson
arrivals, with TTFT, TPOT and end-to-end latency percentiles and the throughput that clients see, against
the same engine called in-process on the same requests.

Redis (embedded unless --redis-url), `tokenq worker` and `tokenq gateway` run as subprocesses, the way
`tokenq up` runs them. Clients stream /v1/completions with token-id prompts and ignore_eos, so every
request generates exactly --output-len tokens; they run in --client-procs processes so that parsing
thousands of SSE events a second does not make the client the bottleneck. Then, with the stack stopped,
an engine in this process with the same settings runs (a) the low-load requests one at a time: the TTFT
difference is what the queue path adds, and (b) the highest-rate phase's requests all at once: the
offline tokens/s that the served tokens/s is compared with.

Low load means an idle GPU between requests, on both paths: each low-load request is sent
--low-load-pause-ms after the one before it ended. (A GPU that has just been idle runs the next prefill a
little slower: on an H200, +0.3 ms after 5-20 ms idle, +0.6 ms after 50 ms. Back to back, with no pause,
the direct engine would skip that cost and the served path, whose requests are always some ms apart,
would not; the direct engine's back-to-back figures are recorded beside the paused ones.)

`--model-shape llama3-8b` serves a random-weight model of that shape (see `tokenq models random`), so
the benchmark runs on a GPU machine with no model download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tokenq.bench import gpu_common as gc
from tokenq.settings import hot_loop_env
from tokenq.supervisor import stop_children


def add_parser(bsub) -> argparse.ArgumentParser:
    return configure(bsub.add_parser("serve", help="gateway + Redis + worker under Poisson arrivals"))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq import settings
    from tokenq.engine_options import add_engine_flags
    from tokenq.flag_checks import MODEL_SHAPES, count, natural, number, output_file, show_defaults

    p.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    p.add_argument("--model-shape", choices=MODEL_SHAPES, metavar="SHAPE", default=None,
                   help="serve a random-weight model of this shape instead (llama3-8b, small, tiny)")
    p.add_argument("--redis-url", default=None, help="default: an embedded Redis of its own")
    p.add_argument("--rate", type=number(above=0, inf=True), nargs="+", default=[4.0],
                   help="Poisson arrival rates, requests/s, one phase each; inf sends all at once")
    p.add_argument("--num-requests", type=count, default=100, help="requests per phase")
    p.add_argument("--min-prompt-len", type=count, default=256)
    p.add_argument("--max-prompt-len", type=count, default=None, help="default: --min-prompt-len")
    p.add_argument("--output-len", type=count, default=64)
    p.add_argument("--low-load-requests", type=count, default=48,
                   help="sequential requests, both paths (the medians of fewer vary more from run to run)")
    p.add_argument("--low-load-output-len", type=count, default=None,
                   help="new tokens of each low-load request, both paths (default: --output-len); they measure TTFT")
    p.add_argument("--low-load-pause-ms", type=number(at_least=0), default=20.0,
                   help="idle time before each low-load request, both paths")
    p.add_argument("--client-procs", type=count, default=None, help="default: half the CPUs, 1 to 8")
    p.add_argument("--gateway-workers", type=count, default=1, help="gateway processes on the one port")
    p.add_argument("--skip-offline", action="store_true", help="no in-process engine reference")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--out", type=output_file, default="bench-serve.json")
    p.add_argument("--plot", type=output_file, default=None, metavar="FILE.png",
                   help="also draw latency against load and throughput over time (needs the plot extra)")
    add_engine_flags(p, device="auto")
    show_defaults(p)
    return p


# ---- the client side ----------------------------------------------------------------------------------


def client_session(connections: int = 1):
    """The benches' streaming HTTP client: aiohttp, whose C parser leaves less of the client's own time in a
    measured time to first token than httpx (docs/BENCHMARKS.md has both clients' floors)."""
    try:
        import aiohttp
    except ImportError as e:
        raise ImportError("the bench's client needs aiohttp: pip install 'tokenq[bench]'") from e

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections + 1),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def _stream_one(session, base: str, model: str, prompt: list[int], output_len: int,
                      trace: list[dict] | None = None) -> gc.Timing:
    """One streamed completion over `session` (`client_session`). With `trace`, appends its job id and the
    wall-clock times of sending and of the first text, to set against the timestamps the gateway and worker
    wrote on the job."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent_wall = time.time()
    t = gc.Timing(added=time.monotonic())
    last = None
    first_wall = None
    job_id = None
    completion_tokens = 0
    async with session.post(f"{base}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if "error" in chunk:  # the gateway stopping, say: the run cannot count this request
                raise RuntimeError(f"the stream ended with an error: {chunk['error'].get('message')}")
            now = time.monotonic()
            job_id = job_id or "job_" + chunk["id"].removeprefix("cmpl-")
            if any(c.get("text") for c in chunk.get("choices", [])):
                if t.first is None:
                    t.first, first_wall = now, time.time()
                last = now
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    t.done = last or time.monotonic()
    t.first = t.first or t.done
    t.tokens = [0] * completion_tokens  # counts only: the text is not kept
    if trace is not None and job_id and first_wall:
        trace.append({"job_id": job_id, "sent": sent_wall, "first": first_wall})
    return t


def _trace_hops(redis_url: str, trace: list[dict]) -> tuple[dict[str, float], dict[str, list[float]], list[int]]:
    """Medians (ms) of where a lone request's TTFT goes, from the timestamps on its job hash: client send to
    job created (HTTP, gateway checks, enqueue), created to started (the worker's read and start script),
    started to the worker's first token (engine-thread wake-up and the prefill step), first token to the
    client (publish, pub/sub, gateway, SSE). One machine, one wall clock. Also each request's hops, and
    which requests of `trace` they are (a job hash without every timestamp is left out)."""
    import statistics

    import redis

    from protocol import job_record as f
    from protocol import keys

    hops: dict[str, list[float]] = {"send_to_created": [], "created_to_started": [],
                                    "started_to_first_token": [], "first_token_to_client": []}
    kept: list[int] = []
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        for i, row in enumerate(trace):
            created, started, first = r.hmget(keys.job_key(row["job_id"]),
                                              [f.CREATED_AT, f.STARTED_AT, f.FIRST_TOKEN_AT])
            if not (created and started and first):
                continue
            kept.append(i)
            marks = [row["sent"], float(created), float(started), float(first), row["first"]]
            for name, a, b in zip(hops, marks, marks[1:], strict=False):
                hops[name].append((b - a) * 1000)
    return {name: statistics.median(v) for name, v in hops.items() if v}, hops, kept


async def _drive(base: str, model: str, prompts: list[list[int]], output_len: int,
                 arrivals: list[float] | None, t0: float | None = None,
                 trace: list[dict] | None = None, pause_s: float = 0.0,
                 warm: list[list[int]] = ()) -> list[gc.Timing]:
    """Requests one at a time (arrivals None), each `pause_s` after the one before ended, or each at t0 +
    its arrival offset (monotonic clock). `warm` go first, untimed, on the same connection (a client that
    keeps its connection, as a service's HTTP client does, pays for opening it once)."""
    async with client_session(len(prompts)) as client:
        for p in warm:
            await _stream_one(client, base, model, p, output_len)
        if arrivals is None:
            timings = []
            for p in prompts:
                await asyncio.sleep(pause_s)
                timings.append(await _stream_one(client, base, model, p, output_len, trace))
            return timings
        start = time.monotonic() if t0 is None else t0

        async def later(delay: float, p: list[int]) -> gc.Timing:
            await asyncio.sleep(max(0.0, start + delay - time.monotonic()))
            return await _stream_one(client, base, model, p, output_len)

        return list(await asyncio.gather(*(later(a, p) for a, p in zip(arrivals, prompts, strict=True))))


def _client_shard(base: str, model: str, prompts: list[list[int]], output_len: int, arrivals: list[float],
                  t0: float) -> list[gc.Timing]:
    """One client process's share of a phase (CLOCK_MONOTONIC is one clock for every process)."""
    return asyncio.run(_drive(base, model, prompts, output_len, arrivals, t0))


def _run_phase(base: str, model: str, prompts: list[list[int]], output_len: int, arrivals: list[float],
               procs: int) -> tuple[list[gc.Timing], float]:
    """All of a phase's requests, dealt round-robin to `procs` client processes; returns the timings in
    prompt order and the wall time from the phase's start to the last token."""
    from concurrent.futures import ProcessPoolExecutor

    procs = max(1, min(procs, len(prompts)))
    shards = [list(range(i, len(prompts), procs)) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(math.sqrt, range(procs)))  # the processes exist and have imported this module
        t0 = time.monotonic() + 0.5
        futures = [pool.submit(_client_shard, base, model, [prompts[i] for i in idx], output_len,
                               [arrivals[i] for i in idx], t0) for idx in shards]
        timings: list[gc.Timing | None] = [None] * len(prompts)
        for idx, fut in zip(shards, futures, strict=True):
            for i, t in zip(idx, fut.result(), strict=True):
                timings[i] = t
    done = [t for t in timings if t is not None]
    return done, max(t.done for t in done) - t0


# ---- the server side ----------------------------------------------------------------------------------


def start_stack(args: argparse.Namespace, model_path: Path, workdir: Path, worker_metrics_port: int | None = None):
    from tokenq.embedded_redis import EmbeddedRedis, free_port
    from tokenq.engine_options import engine_flags_argv
    from tokenq.supervisor import wait_ready

    redis = None if args.redis_url else EmbeddedRedis(workdir / "redis").start()
    url = args.redis_url or redis.url
    port = free_port()
    env = {**os.environ, "TOKENQ_REDIS_URL": url, "PYTHONUNBUFFERED": "1",
           "TOKENQ_GATEWAY_WORKERS": str(args.gateway_workers), **hot_loop_env(args.device)}  # as `tokenq up`
    procs = [
        subprocess.Popen([sys.executable, "-m", "tokenq", "worker", "--model", str(model_path),
                          *engine_flags_argv(args),
                          *(["--metrics-port", str(worker_metrics_port)] if worker_metrics_port else [])], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(workdir / "worker.log", "wb")),
        subprocess.Popen([sys.executable, "-m", "tokenq", "gateway", "--port", str(port)], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(workdir / "gateway.log", "wb")),
    ]
    base = f"http://127.0.0.1:{port}"
    if not wait_ready(f"{base}/readyz", procs, timeout=900):
        stop_stack(procs, redis)
        raise RuntimeError(f"the stack did not become ready; logs in {workdir}")
    return base, procs, redis


# The worker's engine totals a phase reads before and after: the seconds the engine process waited for the
# worker to take its reports, and the steps it launched (JSON name: metric).
ENGINE_TOTALS = {"engine_report_send_s": "tokenq_worker_engine_report_send_seconds_total",
                 "steps": "tokenq_worker_engine_steps_total",
                 "prefill_steps": "tokenq_worker_engine_prefill_steps_total",
                 "step_tokens": "tokenq_worker_engine_step_tokens_total"}


def _metric_totals(url: str, names: list[str]) -> dict[str, float | None]:
    """The totals of these metrics on a Prometheus endpoint (report.metric_totals)."""
    import httpx

    from tokenq.bench.report import metric_totals

    return metric_totals(httpx.get(url, timeout=10).text, names)


def _engine_totals_during(url: str, phase: Callable[[], tuple[list[gc.Timing], float]]
                          ) -> tuple[list[gc.Timing], float, dict[str, float | None]]:
    """Runs a phase; returns its timings, its wall time and what the worker's engine totals grew by (read
    from the worker's metrics, which heartbeats refresh; None where absent)."""
    from protocol.workers import HEARTBEAT_INTERVAL_S

    names = list(ENGINE_TOTALS.values())
    time.sleep(HEARTBEAT_INTERVAL_S + 0.5)  # what came before the phase is in the metrics
    before = _metric_totals(url, names)
    timings, wall = phase()
    time.sleep(HEARTBEAT_INTERVAL_S + 0.5)
    after = _metric_totals(url, names)
    grew = {key: None if before[m] is None or after[m] is None else after[m] - before[m]
            for key, m in ENGINE_TOTALS.items()}
    return timings, wall, grew


def stop_stack(procs: list[subprocess.Popen], redis) -> None:
    stop_children(procs)
    if redis is not None:
        redis.stop()


def _offline(path: Path, args: argparse.Namespace, low: list[list[int]], loaded: list[list[int]] | None
             ) -> tuple[list[gc.Timing], list[gc.Timing], dict | None]:
    """The same engine in this process, no HTTP, no Redis: the low-load requests one at a time with the
    pause before each, then again back to back, then the loaded requests all at once (None: skipped)."""
    from protocol.sampling import SamplingParams
    from tokenq.engine_options import engine_config_from
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(path, engine_config_from(args))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    low_params = params.model_copy(update={"max_tokens": args.low_load_output_len})
    gc.warm_up(engine, engine.model_cfg.vocab_size, args.min_prompt_len)
    direct: dict[float, list[gc.Timing]] = {args.low_load_pause_ms: [], 0.0: []}
    for pause_ms, timings in direct.items():
        for i, p in enumerate(low):
            time.sleep(pause_ms / 1000)
            (t,), _ = gc.run_timed(engine, [p], low_params, tag=f"direct{i}")
            engine.block_manager.reset_prefix_cache()
            timings.append(t)
    offline = None
    if loaded is not None:
        gc.sync(args.device)
        before = engine.launched.totals()
        timings, wall = gc.run_timed(engine, loaded, params, tag="offline")
        launched = {k: v - before[k] for k, v in engine.launched.totals().items()}
        offline = {**_summary(timings, wall), **launched,
                   "all_lengths_ok": all(len(t.tokens) == args.output_len for t in timings)}
    gc.free_engine(engine)
    return direct[args.low_load_pause_ms], direct[0.0], offline


def _offline_all(path: Path, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """The same engine in this process, every prompt at once: the offline output tokens/s."""
    from protocol.sampling import SamplingParams
    from tokenq.engine_options import engine_config_from
    from worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(path, engine_config_from(args))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    gc.warm_up(engine, engine.model_cfg.vocab_size, args.min_prompt_len)
    gc.sync(args.device)
    timings, wall = gc.run_timed(engine, prompts, params, tag="offline")
    gc.free_engine(engine)
    return {**_summary(timings, wall), "all_lengths_ok": all(len(t.tokens) == args.output_len for t in timings)}


def _summary(timings: list[gc.Timing], wall: float) -> dict:
    tokens = sum(len(t.tokens) for t in timings)
    return {"num_requests": len(timings), "seconds": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(timings) / wall,
            "ttft_ms": gc.stats([t.ttft for t in timings]),
            "tpot_ms": gc.stats([t.tpot for t in timings if t.tpot is not None]),
            "e2e_ms": gc.stats([t.e2e for t in timings])}


def _relative(timings: list[gc.Timing], wall: float) -> list[list[float]]:
    """Each request's [first token, done] in seconds from the phase's start, and its output tokens: what
    the throughput-over-time plot bins."""
    t0 = max(t.done for t in timings) - wall
    return [[round(t.first - t0, 4), round(t.done - t0, 4), len(t.tokens)] for t in timings]


def _client_floor(prompts: list[list[int]], pause_s: float) -> list[gc.Timing]:
    """The same lone streamed requests against a server that answers at once (null_server): the client's and
    HTTP's own part of a time to first token."""
    from tokenq.embedded_redis import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tokenq.bench.null_server:app", "--port", str(port),
                             "--loop", "uvloop", "--http", "httptools", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60)
        return asyncio.run(_drive(f"http://127.0.0.1:{port}", "null", prompts, 1, None, pause_s=pause_s,
                                  warm=prompts[:1]))
    finally:
        stop_children([proc])


def _model_path(args: argparse.Namespace, workdir: Path) -> tuple[str, Path]:
    from tokenq.model_store import resolve_model

    if args.model_shape:
        from worker.models.random_weights import write_random_model_dir

        path = write_random_model_dir(args.model_shape, workdir / f"random-{args.model_shape}", seed=args.seed)
        return path.name, path
    return resolve_model(args.model)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenq.bench.report import machine_info, print_table, write_json
    from worker.models.config import ModelConfig

    args.device = gc.resolve_device(args.device)
    args.low_load_output_len = args.low_load_output_len or args.output_len
    workdir = args.workdir
    name, path = _model_path(args, workdir)
    vocab = ModelConfig.from_dir(path).vocab_size
    lo, hi = args.min_prompt_len, args.max_prompt_len or args.min_prompt_len
    n, n_low = args.num_requests, args.low_load_requests
    prompts = gc.random_prompts(2 + n_low + n * len(args.rate), lo, hi, vocab, args.seed)
    warm, low = prompts[:2], prompts[2 : 2 + n_low]
    phases = []
    rng = np.random.default_rng(args.seed)
    for k, rate in enumerate(args.rate):
        arrivals = [0.0] * n if math.isinf(rate) else np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()
        phases.append((rate, prompts[2 + n_low + k * n : 2 + n_low + (k + 1) * n], arrivals))
    client_procs = args.client_procs or max(1, min(8, (os.cpu_count() or 2) // 2))
    print(f"{n} requests a phase at {args.rate} req/s (Poisson), prompts of {lo}-{hi} tokens, {args.output_len} "
          f"new tokens each; model {name} on {args.device}; {client_procs} client processes")

    from tokenq.embedded_redis import free_port

    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    base, procs, redis = start_stack(args, path, workdir, worker_metrics_port=metrics_port)
    try:
        trace: list[dict] = []
        low_t = asyncio.run(_drive(base, name, low, args.low_load_output_len, None, trace=trace,
                                   pause_s=args.low_load_pause_ms / 1000, warm=warm))
        hops, hops_each, traced = _trace_hops(args.redis_url or redis.url, trace)
        served = [(rate, *_engine_totals_during(
            metrics_url, lambda p=p, a=a: _run_phase(base, name, p, args.output_len, a, client_procs)))
            for rate, p, a in phases]
    finally:
        stop_stack(procs, redis)
    floor_t = _client_floor(low, args.low_load_pause_ms / 1000)
    top = max(range(len(phases)), key=lambda k: phases[k][0])
    direct_t, back_to_back_t, offline = _offline(path, args, low, None if args.skip_offline else phases[top][1])

    gateway_low = _summary(low_t, sum(t.e2e for t in low_t))  # as the direct rows: no pauses between requests
    direct = _summary(direct_t, sum(t.e2e for t in direct_t))
    back_to_back = _summary(back_to_back_t, sum(t.e2e for t in back_to_back_t))
    result = {
        "benchmark": "serve", "model": name, "model_shape": args.model_shape, "device": args.device,
        "machine": machine_info(),
        "workload": {"rates": args.rate, "num_requests": n, "min_prompt_len": lo, "max_prompt_len": hi,
                     "output_len": args.output_len, "low_load_requests": n_low, "seed": args.seed,
                     "low_load_output_len": args.low_load_output_len,
                     "low_load_pause_ms": args.low_load_pause_ms,
                     "client_procs": client_procs, "gateway_workers": args.gateway_workers,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "hot_loop": {**os.environ, **hot_loop_env(args.device)}.get("TOKENQ_HOT_LOOP", "0") == "1"},
        # engine_report_send_s: how long the engine process waited on the worker to take its reports (no step
        # launches meanwhile): the worker's side limiting the phase, when it is a sizeable part of `seconds`.
        # steps, prefill_steps, step_tokens: what the engine launched for the phase (the offline run has its own).
        "phases": [{"rate": rate, **_summary(t, wall), **grew, "requests": _relative(t, wall)}
                   for rate, t, wall, grew in served],
        "low_load_gateway": gateway_low, "low_load_direct": direct, "low_load_direct_back_to_back": back_to_back,
        "offline": offline,
        "ttft_overhead_ms_p50": gateway_low["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"],
        # Paired: the median over requests of (via gateway - direct) for the same prompt.
        "ttft_overhead_ms_paired_p50": statistics.median(
            (g.ttft - d.ttft) * 1e3 for g, d in zip(low_t, direct_t, strict=True)),
        # The same against the direct engine run back to back, no pause (the served requests keep theirs).
        "ttft_overhead_ms_paired_p50_vs_back_to_back": statistics.median(
            (g.ttft - d.ttft) * 1e3 for g, d in zip(low_t, back_to_back_t, strict=True)),
        # The same prompts in the same order on both paths: request i against request i.
        "low_load_ttft_ms_each": {"gateway": [t.ttft * 1e3 for t in low_t], "direct": [t.ttft * 1e3 for t in direct_t],
                                  "direct_back_to_back": [t.ttft * 1e3 for t in back_to_back_t]},
        # The same client and requests against a server that answers at once: the client's and HTTP's own part.
        "client_floor_ttft_ms": gc.stats([t.ttft for t in floor_t]),
        "low_load_ttft_hops_ms_p50": hops,
        "low_load_ttft_hops_ms_each": hops_each,
        # The worker's engine against the same engine in-process, prompt by prompt: started to first token
        # on the served path minus the direct TTFT (how much of the added time is inside the worker).
        "engine_extra_ms_paired_p50": statistics.median(
            s - direct_t[i].ttft * 1e3 for s, i in zip(hops_each["started_to_first_token"], traced, strict=True)
        ) if traced else None,
    }
    top_phase = result["phases"][top]
    if offline:
        result["served_over_offline"] = top_phase["output_tokens_per_s"] / offline["output_tokens_per_s"]
    low_ok = all(len(t.tokens) == args.low_load_output_len for t in low_t + direct_t + back_to_back_t)
    served_ok = all(len(t.tokens) == args.output_len for _, ts, _, _ in served for t in ts)
    result["all_lengths_ok"] = low_ok and served_ok and (offline is None or offline["all_lengths_ok"])

    rows = [[f"rate {p['rate']:g}/s via gateway", *_row(p)] for p in result["phases"]]
    rows += [["one at a time, via gateway", *_row(gateway_low)], ["one at a time, engine direct", *_row(direct)],
             ["  the same, back to back", *_row(back_to_back)]]
    if offline:
        rows.append(["all at once, engine offline", *_row(offline)])
    print_table("serving latency (ms) and throughput", ["path", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                                                        "e2e p50", "e2e p99", "output tok/s"], rows)
    print(f"\nthe queue path adds {result['ttft_overhead_ms_p50']:.2f} ms to TTFT at low load (p50; "
          f"{result['ttft_overhead_ms_paired_p50']:.2f} ms as the median of each prompt's difference; "
          f"{args.low_load_pause_ms:g} ms idle before each request; against the direct engine back to back "
          f"{result['ttft_overhead_ms_paired_p50_vs_back_to_back']:.2f} ms)")
    print(f"the same client against a server that answers at once (null_server): TTFT p50 "
          f"{result['client_floor_ttft_ms']['p50']:.2f} ms (the client's and HTTP's own part of the figures above)")
    if hops:
        print("lone requests, medians: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} ms" for k, v in hops.items()))
        print(f"the worker's engine reaches the first token {result['engine_extra_ms_paired_p50']:.2f} ms after "
              "the direct engine (median of each prompt's difference)")
    for p in (p for p in result["phases"] if p["engine_report_send_s"] is not None):
        print(f"rate {p['rate']:g}/s: the engine process waited {p['engine_report_send_s']:.3f} s of the phase's "
              f"{p['seconds']:.2f} s for the worker to take its reports")
    if offline:
        print(f"served/offline output tok/s at rate {top_phase['rate']:g}: {result['served_over_offline']:.3f}")
        if top_phase.get("steps"):
            print("steps launched, served against offline: " + ", ".join(
                f"{_steps_line(run)} {label}" for label, run in (("served", top_phase), ("offline", offline))))
    write_json(args.out, result)
    if args.plot:
        from tokenq.bench.plot import plot_serve

        print(f"plot: {plot_serve(result, args.plot)}")
    return 0 if result["all_lengths_ok"] else 1


def _steps_line(run: dict) -> str:
    """A run's launched steps and the wall time per step (its seconds over its steps)."""
    return (f"{run['steps']:.0f} ({run['prefill_steps']:.0f} with prefill, {run['step_tokens']:.0f} tokens, "
            f"{run['seconds'] / run['steps'] * 1e3:.2f} ms a step)")


def _row(s: dict) -> list[float]:
    return [s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["tpot_ms"].get("p50", 0.0), s["tpot_ms"].get("p99", 0.0),
            s["e2e_ms"]["p50"], s["e2e_ms"]["p99"], s["output_tokens_per_s"]]


if __name__ == "__main__":
    gc.standalone(configure, main)
