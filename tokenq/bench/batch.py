"""`tokenq bench batch`: the standard load submitted as one Batch API file, against the offline engine on
the same prompts in the same run, and the TTFT of interactive requests while the batch runs against
their TTFT on an idle engine.

Redis (embedded unless --redis-url), `tokenq worker`, `tokenq gateway` and `tokenq batches` run as
subprocesses, as `tokenq up` runs them. Lines are /v1/completions with token-id prompts and ignore_eos,
so each generates exactly --output-len tokens. The batch's time runs from its creation to the moment a
poll sees it `completed` (its output file written). Interactive requests are streamed one at a time, each
--pause-ms after the one before, first on the idle stack, then while the batch runs. Then, with the stack
stopped, an engine in this process with the same settings runs every prompt at once: the offline
tokens/s the batch is held against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tokenq.bench import gpu_common as gc

POLL_S = 0.02  # the batch's status poll: its end is seen within this (a GET on the gateway costs ~1 ms)


def add_parser(bsub) -> argparse.ArgumentParser:
    return configure(bsub.add_parser("batch", help="one Batch API file vs the offline engine; interactive "
                                                   "TTFT while it runs vs idle"))


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenq import settings
    from tokenq.engine_options import add_engine_flags
    from tokenq.flag_checks import MODEL_SHAPES, count, natural, number, output_file, show_defaults

    p.add_argument("--model", default=settings.model_name(), help="a known model name or a HF directory")
    p.add_argument("--model-shape", choices=MODEL_SHAPES, metavar="SHAPE", default=None,
                   help="serve a random-weight model of this shape instead (llama3-8b, small, tiny)")
    p.add_argument("--redis-url", default=None, help="default: an embedded Redis of its own")
    p.add_argument("--num-requests", type=count, default=512, help="lines of the batch file")
    p.add_argument("--min-prompt-len", type=count, default=64)
    p.add_argument("--max-prompt-len", type=count, default=512)
    p.add_argument("--output-len", type=count, default=256)
    p.add_argument("--interactive-requests", type=count, default=24,
                   help="lone streamed requests, idle and again while the batch runs")
    p.add_argument("--interactive-output-len", type=count, default=16)
    p.add_argument("--pause-ms", type=number(at_least=0), default=200.0, help="between interactive requests")
    p.add_argument("--window", type=count, default=None, help="the feeder's window (TOKENQ_BATCH_WINDOW; "
                                                              "default: twice --max-num-seqs)")
    p.add_argument("--gateway-workers", type=count, default=1, help="gateway processes on the one port")
    p.add_argument("--skip-offline", action="store_true", help="no in-process engine reference")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--out", type=output_file, default="bench-batch.json")
    add_engine_flags(p, device="auto")
    show_defaults(p)
    return p


def _batch_file(path: Path, model: str, prompts: list[list[int]], output_len: int) -> None:
    with path.open("w") as f:
        for i, prompt in enumerate(prompts):
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                    "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")


def _run_batch(base: str, path: Path, started: threading.Event) -> dict:
    """Upload, create, poll until final; the batch's seconds and output tokens."""
    import httpx

    with httpx.Client(base_url=base, timeout=600) as client, path.open("rb") as f:
        r = client.post("/v1/files", data={"purpose": "batch"}, files={"file": (path.name, f)})
        r.raise_for_status()
        file_id = r.json()["id"]
        t0 = time.monotonic()
        r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                             "completion_window": "24h"})
        r.raise_for_status()
        batch = r.json()
        started.set()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(POLL_S)
            batch = client.get(f"/v1/batches/{batch['id']}").raise_for_status().json()
        seconds = time.monotonic() - t0
        seen = time.time()
        tokens, lengths = 0, []
        if batch.get("output_file_id"):
            for line in client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines():
                usage = json.loads(line)["response"]["body"]["usage"]
                tokens += usage["completion_tokens"]
                lengths.append(usage["completion_tokens"])
    return {"id": batch["id"], "status": batch["status"], "seconds": seconds, "output_tokens": tokens,
            "output_tokens_per_s": tokens / seconds, "request_counts": batch["request_counts"],
            "usage": batch.get("usage"), "lengths": lengths, "seen_at": seen}


def _wait_feeder(redis_url: str, feeder: subprocess.Popen, timeout: float = 300) -> None:
    """Until the feeder listens for new batches: the batch's clock must not count its start-up."""
    import redis as sync_redis

    from batches import keys as K

    r = sync_redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while r.pubsub_numsub(K.NEW_BATCHES)[0][1] < 1:
            if feeder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the batch feeder did not start")
            time.sleep(0.05)
    finally:
        r.close()


def _phases(redis_url: str, batch: dict, model: str, n: int, window: int) -> dict[str, float]:
    """Where the batch's time went, in seconds from its creation (the batch's and its line jobs' own
    timestamps in Redis): the feeder's pick-up, its first window of lines queued, the engine's first and
    last line, the files written, and the poll that saw it end. `engine_s` (first line started to last line done) is the part that the
    offline engine's time compares with; the rest is the fixed cost of the Batch API path."""
    import redis as sync_redis

    from batches import keys as K
    from batches.submit import line_job_id
    from protocol import job_record as F
    from protocol import keys

    r = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        b = r.hgetall(K.batch_key(batch["id"]))
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.hmget(keys.job_key(line_job_id(batch["id"], i, model)), [F.CREATED_AT, F.STARTED_AT, F.FINISHED_AT])
        rows = [[float(x) if x else None for x in row] for row in pipe.execute()]
    finally:
        r.close()
    t0 = float(b["created_at"])
    created = sorted(row[0] for row in rows if row[0] is not None)
    started = [row[1] for row in rows if row[1] is not None]
    finished = [row[2] for row in rows if row[2] is not None]
    end = float(b.get("completed_at") or b.get("failed_at") or b.get("expired_at") or b.get("cancelled_at") or t0)
    out = {"in_progress": float(b.get("in_progress_at") or t0) - t0,
           "first_window_queued": (created[:window] or [t0])[-1] - t0,
           "first_line_started": min(started, default=t0) - t0, "last_line_started": max(started, default=t0) - t0,
           "last_line_done": max(finished, default=t0) - t0, "finalizing": float(b.get("finalizing_at") or t0) - t0,
           "ended": end - t0, "seen": batch["seen_at"] - t0}
    out["engine_s"] = out["last_line_done"] - out["first_line_started"]
    return {k: round(v, 4) for k, v in out.items()}


def _interactive(base: str, model: str, prompts: list[list[int]], output_len: int, pause_s: float,
                 while_set: threading.Event | None = None, until: threading.Event | None = None) -> list[gc.Timing]:
    """Lone streamed requests; with `until`, only those sent before it is set count (the batch still ran)."""
    from tokenq.bench.serve import _stream_one, client_session

    async def go() -> list[gc.Timing]:
        timings = []
        async with client_session() as client:
            await _stream_one(client, base, model, prompts[0], output_len)  # the connection, untimed
            for p in prompts[1:]:
                await asyncio.sleep(pause_s)
                if until is not None and until.is_set():
                    break
                t = await _stream_one(client, base, model, p, output_len)
                if until is None or not until.is_set():
                    timings.append(t)
        return timings

    if while_set is not None:
        while_set.wait()
    return asyncio.run(go())


def main(args: argparse.Namespace) -> int:
    from tokenq.bench.report import machine_info, print_table, write_json
    from tokenq.bench.serve import _model_path, _offline_all, start_stack, stop_stack
    from worker.models.config import ModelConfig

    args.device = gc.resolve_device(args.device)
    workdir = args.workdir
    name, path = _model_path(args, workdir)
    vocab = ModelConfig.from_dir(path).vocab_size
    lo, hi, n = args.min_prompt_len, args.max_prompt_len, args.num_requests
    prompts = gc.random_prompts(n, lo, hi, vocab, args.seed)
    lone = gc.random_prompts(2 * args.interactive_requests + 2, lo, lo, vocab, args.seed + 1)
    batch_path = workdir / "batch.jsonl"
    _batch_file(batch_path, name, prompts, args.output_len)
    window = args.window or 2 * args.max_num_seqs
    print(f"{n} lines (prompts of {lo}-{hi} tokens, {args.output_len} new tokens each) as one batch; model "
          f"{name} on {args.device}; feeder window {window}")

    os.environ["TOKENQ_BATCH_WINDOW"] = str(window)
    base, procs, redis = start_stack(args, path, workdir)
    feeder = subprocess.Popen([sys.executable, "-m", "tokenq", "batches"],
                              env={**os.environ, "TOKENQ_REDIS_URL": args.redis_url or redis.url},
                              stdout=subprocess.DEVNULL, stderr=open(workdir / "batches.log", "wb"))
    procs.append(feeder)
    try:
        _wait_feeder(args.redis_url or redis.url, feeder)
        pause = args.pause_ms / 1000
        half = args.interactive_requests + 1
        idle = _interactive(base, name, lone[:half], args.interactive_output_len, pause)
        started, ended = threading.Event(), threading.Event()
        busy: list[gc.Timing] = []
        side = threading.Thread(target=lambda: busy.extend(_interactive(
            base, name, lone[half:], args.interactive_output_len, pause, started, ended)))
        side.start()
        try:
            batch = _run_batch(base, batch_path, started)
        finally:
            ended.set()
            started.set()
            side.join()
        phases = _phases(args.redis_url or redis.url, batch, name, n, window)
    finally:
        stop_stack(procs, redis)
    offline = None if args.skip_offline else _offline_all(path, args, prompts)

    idle_p50 = gc.stats([t.ttft for t in idle]).get("p50")
    busy_p50 = gc.stats([t.ttft for t in busy]).get("p50")
    lengths = batch.pop("lengths")
    batch.pop("seen_at")
    batch["phases_s"] = phases
    result = {
        "benchmark": "batch", "model": name, "model_shape": args.model_shape, "device": args.device,
        "machine": machine_info(),
        "workload": {"num_requests": n, "min_prompt_len": lo, "max_prompt_len": hi, "output_len": args.output_len,
                     "interactive_requests": args.interactive_requests, "pause_ms": args.pause_ms,
                     "interactive_output_len": args.interactive_output_len, "window": window, "seed": args.seed,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens},
        "batch": batch, "offline": offline,
        "batch_over_offline": batch["output_tokens_per_s"] / offline["output_tokens_per_s"] if offline else None,
        "interactive_idle_ttft_ms": gc.stats([t.ttft for t in idle]),
        "interactive_during_batch_ttft_ms": gc.stats([t.ttft for t in busy]),
        "interactive_during_batch_count": len(busy),
        "ttft_p50_during_over_idle": busy_p50 / idle_p50 if busy_p50 and idle_p50 else None,
        "all_lengths_ok": batch["status"] == "completed" and len(lengths) == n
                          and all(k == args.output_len for k in lengths),
    }
    rows = [["batch via /v1/batches", batch["seconds"], batch["output_tokens"], batch["output_tokens_per_s"]]]
    if offline:
        rows.append(["engine offline, all at once", offline["seconds"], offline["output_tokens"],
                     offline["output_tokens_per_s"]])
    print_table("batch throughput", ["path", "seconds", "output tokens", "output tok/s"], rows)
    if offline:
        print(f"batch/offline output tok/s: {result['batch_over_offline']:.3f}")
    print("batch phases, seconds from its creation: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    during = (f"{busy_p50:.1f} ms ({len(busy)} requests; ratio {result['ttft_p50_during_over_idle']:.2f})"
              if busy and result["ttft_p50_during_over_idle"] is not None
              else "none ran while the batch did (a batch shorter than the first pause)")
    print(f"interactive TTFT p50: idle {idle_p50 or 0:.1f} ms, during the batch {during}")
    write_json(args.out, result)
    return 0 if result["all_lengths_ok"] else 1


if __name__ == "__main__":
    gc.standalone(configure, main)
