"""`tokenq bench queue`: how fast the gateway accepts jobs, against the raw XADD rate of the same Redis.

A Redis of its own (or --redis-url), the gateway as a `tokenq gateway` subprocess, a fake live worker
(heartbeat and model card only: nothing consumes, so every accepted job stays queued), then N keep-alive
httpx clients POST /v1/jobs. The peer is redis-py doing XADD of the same payload size on the same Redis,
one at a time and pipelined.

Honest counting: only 202 answers count as accepted, latency is timed per request by the client, and at
the end the entries on the lane's streams (XLEN) must equal every job accepted (warm-ups included), else
the run fails. The defaults (2 gateway processes, 1/32/64 clients) are the settings the target is quoted
at: 3,000 jobs/s with client, Redis and gateway on one 2-core machine.

Two submission paths, one after the other on the same Redis (`--paths`): `hand-written` is the gateway as
it ships (gateway/fastpath.py ahead of FastAPI, jobstore/pipe.py instead of redis-py on the submit
path); `library` is FastAPI and redis-py alone (TOKENQ_GATEWAY_LIBRARY_PATH=1). The hand-written pieces
stay only while this comparison shows the library path short of the target and theirs meeting it; the
report prints both and says which path meets the target."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_MODEL = "bench-model"
WORKER_ID = "bench:fake-worker"
PROMPT = "Write one short sentence about queues."


def add_queue_parser(bsub: argparse._SubParsersAction) -> None:
    from tokenq.flag_checks import (
        count,
        names,
        natural,
        output_file,
        positive_number,
        show_defaults,
        whole_numbers,
    )

    q = bsub.add_parser("queue", help="gateway enqueue rate (POST /v1/jobs, nothing consuming) vs raw XADD")
    q.add_argument("--redis-url", default=None, help="use this Redis (default: start a redis-server)")
    q.add_argument("--concurrency", type=whole_numbers(at_least=1), default="1,32,64",
                   help="concurrent keep-alive clients; a comma-separated list runs each in turn")
    q.add_argument("--requests", type=count, default=20000, help="jobs to submit (after the warm-up)")
    q.add_argument("--warmup", type=natural, default=1000)
    q.add_argument("--client-procs", type=count, default=1, help="processes that run the clients")
    q.add_argument("--gateway-workers", type=count, default=2, help="gateway processes on the one port")
    q.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="load generator: a minimal HTTP/1.1 client (default) or httpx")
    q.add_argument("--xadd-ops", type=count, default=20000)
    q.add_argument("--paths", type=names(("hand-written", "library")), default="hand-written,library",
                   help="submission paths to run, comma-separated: hand-written (as shipped), library (FastAPI + "
                        "redis-py alone)")
    q.add_argument("--target", type=positive_number, default=3000.0, help="jobs/s the gateway must accept")
    q.add_argument("--out", type=output_file, default="bench-queue.json")
    q.set_defaults(func=cmd_bench_queue)
    show_defaults(q)


def cmd_bench_queue(args: argparse.Namespace) -> int:
    from tokenq.bench.launch import launch

    return launch("queue", main, args)


def main(args: argparse.Namespace) -> int:
    from tokenq.embedded_redis import EmbeddedRedis, free_port, wait_for_port

    workdir = args.workdir
    redis_server = None if args.redis_url else EmbeddedRedis(workdir / "redis").start()
    redis_url = args.redis_url or redis_server.url
    runs: list[dict] = []
    gateway: subprocess.Popen | None = None
    try:
        asyncio.run(_cleanup(redis_url))  # what an earlier, interrupted run left would spoil the XLEN check
        asyncio.run(_register_fake_worker(redis_url))
        redis_pid = redis_server.proc.pid if redis_server is not None and redis_server.proc else None
        for path in args.paths.split(","):
            port = free_port()
            env = {**os.environ, "TOKENQ_MAX_QUEUE_DEPTH": "0", "PYTHONUNBUFFERED": "1",
                   "TOKENQ_GATEWAY_WORKERS": str(args.gateway_workers),
                   "TOKENQ_GATEWAY_LIBRARY_PATH": "1" if path == "library" else ""}
            gateway = subprocess.Popen([sys.executable, "-m", "tokenq", "gateway", "--redis-url", redis_url,
                                        "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(workdir / f"gateway-{path}.log", "wb"))
            wait_for_port(port, timeout=120)  # a loaded machine starts two gateway processes slowly
            base = f"http://127.0.0.1:{port}"
            runs += [{**_run_clients(base, args, int(c), gateway.pid, redis_pid), "path": path}
                     for c in str(args.concurrency).split(",")]
            gateway.terminate()
            gateway.wait(timeout=10)
            gateway = None
        queued = asyncio.run(_queued(redis_url))
        xadd = asyncio.run(_xadd_rates(redis_url, args.xadd_ops, len(_job_body())))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=10)
        asyncio.run(_cleanup(redis_url))
        if redis_server is not None:
            redis_server.stop()
            shutil.rmtree(workdir / "redis", ignore_errors=True)  # its AOF: every job of the run
    expected = sum(gw["accepted"] + gw["warmup_accepted"] for gw in runs)
    _report(args, runs, queued, expected, xadd)
    return 0 if queued == expected and all(gw["errors"] == 0 for gw in runs) else 1


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its direct children (the gateway's workers). Summed from each thread's
    schedstat (nanoseconds) where the kernel keeps it: /proc/*/stat counts in 10 ms ticks, too coarse for a
    few dozen jobs that cost tens of microseconds each."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += _process_cpu_seconds(stat.parent, fields)
    return total


def _process_cpu_seconds(proc: Path, stat_fields: list[str]) -> float:
    try:
        return sum(int((task / "schedstat").read_text().split()[0]) for task in (proc / "task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return (int(stat_fields[11]) + int(stat_fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- set-up: a worker that looks alive, with a model card ------------------------------------------


def _model_card():
    from protocol.workers import ModelCard
    from tokenq.model_store import models_dir
    from tokenq.settings import DEFAULT_MODEL

    model_dir = models_dir() / DEFAULT_MODEL
    if (model_dir / "tokenizer.json").exists():  # the real tokenizer and chat template when pulled
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        return ModelCard(name=BENCH_MODEL, max_model_len=2048,
                         tokenizer_json=(model_dir / "tokenizer.json").read_text(),
                         chat_template=(model_dir / "chat_template.jinja").read_text(),
                         bos_token=config.get("bos_token"), eos_token=config.get("eos_token"))
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(PROMPT.lower().replace(".", " .").split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return ModelCard(name=BENCH_MODEL, max_model_len=2048, tokenizer_json=tok.to_str())


async def _register_fake_worker(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from protocol import keys
    from protocol.workers import WorkerHeartbeat

    card = _model_card()
    redis = aioredis.from_url(redis_url, decode_responses=True)
    beat = WorkerHeartbeat(worker_id=WORKER_ID, model=BENCH_MODEL, max_model_len=card.max_model_len,
                           capacity=256)
    await redis.hset(keys.model_card_key(BENCH_MODEL), "card", card.model_dump_json())
    await redis.set(keys.worker_key(WORKER_ID), beat.model_dump_json(), ex=3600)
    await redis.sadd(keys.WORKERS_SET, WORKER_ID)
    await redis.aclose()


async def _queued(redis_url: str) -> int:
    import redis.asyncio as aioredis

    from protocol import keys

    redis = aioredis.from_url(redis_url, decode_responses=True)
    total = 0
    for lane in keys.LANES:
        for tenant in await redis.smembers(keys.lane_tenants_key(BENCH_MODEL, lane)):
            total += await redis.xlen(keys.jobs_stream(BENCH_MODEL, lane, tenant))
    await redis.aclose()
    return total


async def _cleanup(redis_url: str) -> None:
    """Remove what the run added (when it used someone else's Redis)."""
    import redis.asyncio as aioredis

    from protocol import keys

    redis = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await redis.delete(keys.worker_key(WORKER_ID), keys.model_card_key(BENCH_MODEL))
        await redis.srem(keys.WORKERS_SET, WORKER_ID)
        for lane in keys.LANES:
            tenants = await redis.smembers(keys.lane_tenants_key(BENCH_MODEL, lane))
            for tenant in tenants:
                stream = keys.jobs_stream(BENCH_MODEL, lane, tenant)
                removed = 0
                async for batch in _stream_job_keys(redis, stream):
                    removed += await redis.delete(*batch)
                await redis.delete(stream)
                await redis.decrby(keys.tenant_queued_key(tenant, BENCH_MODEL), removed)
            await redis.delete(keys.lane_tenants_key(BENCH_MODEL, lane), keys.lane_depth_key(BENCH_MODEL, lane))
        await redis.srem(keys.MODELS_SET, BENCH_MODEL)
        await redis.delete("bench:xadd")
    except Exception as e:  # noqa: BLE001 - best effort
        print(f"cleanup: {e!r}", file=sys.stderr)
    finally:
        await redis.aclose()


async def _stream_job_keys(redis, stream: str):
    from protocol import keys

    last = "-"
    while True:
        entries = await redis.xrange(stream, min=last, count=1000)
        entries = [e for e in entries if e[0] != last]
        if not entries:
            return
        yield [keys.job_key(fields["job_id"]) for _, fields in entries]
        last = entries[-1][0]


# ---- the gateway under load --------------------------------------------------------------------------


def _job_body() -> bytes:
    return json.dumps({"model": BENCH_MODEL, "prompt": PROMPT, "max_tokens": 16, "priority": "batch"}).encode()


def _run_clients(base: str, args: argparse.Namespace, concurrency: int, gateway_pid: int,
                 redis_pid: int | None) -> dict:
    """Runs the clients in `--client-procs` processes and merges their results; the CPU time of the gateway
    (and of the Redis the bench started) is taken over the measured requests only."""
    per_proc = args.requests // args.client_procs
    conc = max(1, concurrency // args.client_procs)
    warm = asyncio.run(_load(base, conc, args.warmup, args.client))  # connections and caches warm, not measured
    if warm["errors"]:
        raise SystemExit(f"warm-up failed: {warm['first_error']}")
    cpu0 = _cpu_seconds(gateway_pid)
    redis_cpu0 = _cpu_seconds(redis_pid) if redis_pid else 0.0
    if args.client_procs == 1:
        results = [asyncio.run(_load(base, conc, per_proc, args.client))]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.client_procs) as pool:
            results = pool.starmap(_load_sync, [(base, conc, per_proc, args.client)] * args.client_procs)
    cpu = _cpu_seconds(gateway_pid) - cpu0
    redis_cpu = _cpu_seconds(redis_pid) - redis_cpu0 if redis_pid else None
    latencies = sorted(x for r in results for x in r["latencies"])
    wall = max(r["wall"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    return {"accepted": accepted, "warmup_accepted": warm["accepted"], "errors": sum(r["errors"] for r in results),
            "wall_s": wall, "jobs_per_s": accepted / wall if wall else 0.0,
            "p50_ms": _pct(latencies, 50) * 1e3, "p99_ms": _pct(latencies, 99) * 1e3,
            "gateway_cpu_us_per_job": cpu / max(1, accepted) * 1e6, "loadavg_1m": os.getloadavg()[0],
            "redis_cpu_us_per_job": redis_cpu / max(1, accepted) * 1e6 if redis_cpu is not None else None,
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
            "concurrency": conc * args.client_procs, "client_procs": args.client_procs, "client": args.client,
            "gateway_workers": args.gateway_workers}


def _load_sync(base: str, concurrency: int, count: int, client: str) -> dict:
    return asyncio.run(_load(base, concurrency, count, client))


async def _load(base: str, concurrency: int, count: int, client: str = "raw") -> dict:
    """`concurrency` keep-alive connections, each sending its next POST when the last answer is in."""
    body = _job_body()
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    remaining = count
    connections = [(_RawConnection if client == "raw" else _HttpxConnection)(base, body)
                   for _ in range(concurrency)]
    for c in connections:
        await c.open()

    async def one_client(conn: _RawConnection | _HttpxConnection) -> None:
        nonlocal remaining, errors, first_error
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status, text = await conn.post()
            latencies.append(time.perf_counter() - t0)
            if status != 202:
                errors += 1
                first_error = first_error or f"{status} {text[:200]}"

    try:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in connections))
        wall = time.perf_counter() - start
    finally:
        for c in connections:
            await c.close()
    return {"latencies": latencies, "accepted": len(latencies) - errors, "errors": errors, "wall": wall,
            "first_error": first_error}


class _HttpxConnection:
    """One httpx client with one connection (a shared pool costs more CPU per request as it grows)."""

    def __init__(self, base: str, body: bytes) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=1))
        self.body = body

    async def open(self) -> None:
        pass

    async def post(self) -> tuple[int, str]:
        r = await self.client.post("/v1/jobs", content=self.body, headers={"content-type": "application/json"})
        return r.status_code, r.text

    async def close(self) -> None:
        await self.client.aclose()


class _RawConnection:
    """A minimal HTTP/1.1 keep-alive client: the request bytes are built once, the answer is read by its
    Content-Length. It costs a fraction of httpx's CPU per request, so that on a small machine the
    numbers are the gateway's, not the load generator's."""

    def __init__(self, base: str, body: bytes) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port or 80)
        self.request = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> tuple[int, str]:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                      if k.strip().lower() == b"content-length")
        return status, (await self.reader.readexactly(length)).decode()

    async def close(self) -> None:
        self.writer.close()


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


# ---- the peer: raw XADD on the same Redis ---------------------------------------------------------------


async def _xadd_rates(redis_url: str, ops: int, payload_bytes: int) -> dict[str, float]:
    import redis.asyncio as aioredis

    redis = aioredis.from_url(redis_url, decode_responses=True)
    fields = {"job_id": "job_" + "0" * 32, "payload": "x" * max(payload_bytes * 3, 1)}
    stream = "bench:xadd"
    await redis.delete(stream)
    t0 = time.perf_counter()
    for _ in range(ops):
        await redis.xadd(stream, fields)
    one_by_one = ops / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for start in range(0, ops, 100):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(100, ops - start)):
                pipe.xadd(stream, fields)
            await pipe.execute()
    pipelined = ops / (time.perf_counter() - t0)
    await redis.delete(stream)
    await redis.aclose()
    return {"xadd_per_s_unpipelined": one_by_one, "xadd_per_s_pipelined_100": pipelined}


# ---- output ------------------------------------------------------------------------------------------------


def _report(args: argparse.Namespace, runs: list[dict], queued: int, expected: int,
            xadd: dict[str, float]) -> None:
    from tokenq.bench.report import machine_info, print_table, write_json

    rows = [[f"{gw['path']}: gateway x{gw['gateway_workers']}, POST /v1/jobs, c={gw['concurrency']}", gw["jobs_per_s"],
             f"{gw['p50_ms']:.2f}", f"{gw['p99_ms']:.2f}", f"{gw['gateway_cpu_us_per_job']:.0f}",
             "" if gw["redis_cpu_us_per_job"] is None else f"{gw['redis_cpu_us_per_job']:.0f}", gw["errors"],
             f"{gw['loadavg_1m']:.1f}"] for gw in runs]
    rows += [
        ["redis-py XADD, one at a time", xadd["xadd_per_s_unpipelined"], "", "", "", "", 0, ""],
        ["redis-py XADD, pipelined x100", xadd["xadd_per_s_pipelined_100"], "", "", "", "", 0, ""],
    ]
    print_table(f"enqueue rate, nothing consuming ({args.client} client, {args.requests} jobs per row)",
                ["path", "per s", "p50 ms", "p99 ms", "gateway CPU us/job", "redis CPU us/job", "errors",
                 "load 1m"], rows)
    verdict = "ok" if queued == expected else "MISMATCH"
    print(f"\nXLEN check: {queued} entries on the lane's streams, {expected} jobs accepted (202, warm-ups "
          f"included): {verdict}")
    for gw in runs:
        if gw["first_error"]:
            print(f"first error (c={gw['concurrency']}): {gw['first_error']}")
    verdicts = _path_verdicts(runs, args.target)
    for line in verdicts.values():
        print(line)
    load = os.getloadavg()
    print(f"load average (1 min) at the end: {load[0]:.1f} on {os.cpu_count()} CPUs")
    write_json(args.out, {"machine": {**machine_info(), "loadavg_1m": load[0]}, "gateway": runs,
                          "queued_entries": queued, "accepted_total": expected,
                          "xlen_check": {"xlen": queued, "accepted": expected, "ok": queued == expected},
                          "xadd": xadd, "target_jobs_per_s": args.target, "paths": verdicts,
                          "settings": {"requests": args.requests, "warmup": args.warmup,
                                       "concurrency": args.concurrency, "client_procs": args.client_procs,
                                       "client": args.client, "gateway_workers": args.gateway_workers,
                                       "paths": args.paths}})


def _path_verdicts(runs: list[dict], target: float) -> dict[str, str]:
    """Per path, its best rate against the target; then whether the hand-written pieces are what meets it.
    On a machine too loaded for either path to meet it, the gateway CPU per job still compares them."""
    best: dict[str, dict] = {}
    for gw in runs:
        if gw["jobs_per_s"] >= best.get(gw["path"], {}).get("jobs_per_s", -1.0):
            best[gw["path"]] = gw
    out = {path: f"{path}: best {gw['jobs_per_s']:.0f} jobs/s at {gw['gateway_cpu_us_per_job']:.0f} us of gateway "
                 f"CPU per job; target {target:.0f}: {'met' if gw['jobs_per_s'] >= target else 'NOT met'}"
           for path, gw in best.items()}
    if "hand-written" in best and "library" in best:
        hand, lib = best["hand-written"], best["library"]
        rate = hand["jobs_per_s"] / max(lib["jobs_per_s"], 1e-9)
        cpu = lib["gateway_cpu_us_per_job"] / max(hand["gateway_cpu_us_per_job"], 1e-9)
        head = f"hand-written path: x{rate:.2f} the library path's rate, x{cpu:.2f} less gateway CPU per job: "
        if lib["jobs_per_s"] >= target:
            tail = "the library path meets the target too, so gateway/fastpath.py and jobstore/pipe.py can go"
        elif hand["jobs_per_s"] >= target:
            tail = "only the hand-written path meets the target, so gateway/fastpath.py and jobstore/pipe.py stay"
        else:
            tail = (f"neither meets the target on this machine (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                    "CPUs); the CPU per job decides")
        out["verdict"] = head + tail
    return out
