"""`tokenq status`: what the queue and the workers are doing, from Redis alone (no gateway, no Prometheus):
lanes and tenants (jobs waiting and running, age of the oldest waiting one), workers (model, running,
KV-cache use, tokens per second), the pool's recent throughput, and a line when Redis is full. `--watch`
redraws it (once its first read worked, it rides out a Redis that goes away, as the roles do, saying so each
time); `--json` prints one snapshot for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from gateway.backlog import StreamBacklog, read_backlog
from gateway.registry import Registry
from jobstore.connect import AnyRedis
from jobstore.memory import RedisMemory, read_memory
from protocol.workers import WorkerHeartbeat
from tokenq.redis_command import run_with_redis


@dataclass
class Snapshot:
    at: float
    streams: list[StreamBacklog]
    workers: list[WorkerHeartbeat]
    lanes: list[dict] = field(default_factory=list)  # per (model, lane), summed over tenants
    memory: RedisMemory | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(w.tokens_per_s for w in self.workers)

    def to_json(self) -> dict:
        return {"at": self.at, "lanes": self.lanes, "tenants": [asdict(s) for s in self.streams],
                "workers": [w.model_dump() for w in self.workers], "tokens_per_s": self.tokens_per_s,
                "redis_memory": self.memory.to_json() if self.memory else None}


def _by_lane(streams: list[StreamBacklog]) -> list[dict]:
    lanes: dict[tuple[str, str], dict] = {}
    for s in streams:
        row = lanes.setdefault((s.model, s.lane), {"model": s.model, "lane": s.lane, "waiting": 0, "running": 0,
                                                   "oldest_waiting_s": 0.0, "tenants": 0})
        row["waiting"] += s.waiting
        row["running"] += s.running
        row["oldest_waiting_s"] = max(row["oldest_waiting_s"], s.oldest_waiting_s)
        row["tenants"] += 1
    return list(lanes.values())


async def snapshot(redis: aioredis.Redis) -> Snapshot:
    now = time.time()
    workers = sorted(await Registry(redis).live_workers(), key=lambda w: (w.model, w.worker_id))
    streams = await read_backlog(redis, now, live={w.worker_id for w in workers})
    return Snapshot(now, streams, workers, _by_lane(streams), await read_memory(redis))


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render(snap: Snapshot, expand: bool = True):  # -> rich renderable (rich is imported here only: --json needs none)
    """The three tables, after a line when Redis is full; `expand` stretches them to the terminal's width (off
    for a pipe, where each column keeps its content's width instead of being cut to 80 columns)."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str) -> Table:
        return Table(title=title, title_justify="left", expand=expand)

    lanes = table("Lanes")
    for col in ("model", "lane", "tenants", "waiting", "running", "oldest waiting"):
        lanes.add_column(col, justify="right" if col not in ("model", "lane") else "left")
    for row in snap.lanes:
        lanes.add_row(row["model"], row["lane"], str(row["tenants"]), str(row["waiting"]), str(row["running"]),
                      _age(row["oldest_waiting_s"]))
    tenants = table("Tenants")
    for col in ("tenant", "model", "lane", "waiting", "running", "oldest waiting"):
        tenants.add_column(col, justify="right" if col in ("waiting", "running", "oldest waiting") else "left")
    for s in sorted(snap.streams, key=lambda s: (-s.waiting, s.tenant)):
        tenants.add_row(s.tenant, s.model, s.lane, str(s.waiting), str(s.running), _age(s.oldest_waiting_s))
    full = snap.memory is not None and snap.memory.full
    title = (f"Workers ({len(snap.workers)} live, {snap.tokens_per_s:.1f} output tokens/s in all)" if snap.workers
             else "Workers: none heard from (Redis is full: it refuses their heartbeats)" if full
             else "Workers: no live worker (queued jobs wait until one starts)")
    workers = table(title)
    for col in ("worker", "model", "device", "running", "waiting", "KV use", "tokens/s", "tokens", "beat"):
        workers.add_column(col, justify="left" if col in ("worker", "model", "device") else "right")
    for w in snap.workers:
        workers.add_row(w.worker_id, w.model, w.device, f"{w.running}/{w.capacity}", str(w.waiting),
                        f"{w.kv_usage:.0%}", f"{w.tokens_per_s:.1f}", f"{w.generation_tokens:.0f}",
                        _age(snap.at - w.at) if snap.at > w.at else "now")
    if full:
        from rich.text import Text

        return Group(Text(snap.memory.line(), style="bold red"), lanes, tenants, workers)
    return Group(lanes, tenants, workers)


PIPE_WIDTH = 1000  # a pipe or file has no width: rich would assume 80 and cut the worker ids and model names
MIN_WATCH_S = 0.1  # a redraw reads every lane and worker: a shorter interval only loads Redis


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds >= MIN_WATCH_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"at least {MIN_WATCH_S:g} seconds (got {text})")
    return seconds


def add_parser(sub: argparse._SubParsersAction, redis_url: str | None) -> None:
    p = sub.add_parser("status", help="lanes, tenants, workers and throughput, read from Redis")
    p.add_argument("--redis-url", default=redis_url)
    p.add_argument("--watch", type=_interval, default=None, metavar="SECONDS",
                   help=f"redraw every SECONDS (at least {MIN_WATCH_S:g})")
    p.add_argument("--json", action="store_true", help="print a snapshot as JSON (with --watch, one line each time)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    return run_with_redis(args.redis_url, lambda redis: _run(redis, args))


async def _run(redis: AnyRedis, args: argparse.Namespace) -> int:
    if args.json and args.watch is None:
        print(json.dumps((await snapshot(redis)).to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.live import Live

    terminal = sys.stdout.isatty()
    console = Console() if terminal else Console(width=PIPE_WIDTH)
    if args.watch is None:
        console.print(render(await snapshot(redis), expand=terminal))
        return 0
    try:
        snap: Snapshot | str = await snapshot(redis)  # a first read that fails ends the command with its error
        if args.json or not terminal:  # a file or a pipe: each snapshot written out as it is read
            while True:
                if isinstance(snap, str):
                    print(snap, file=sys.stderr, flush=True)
                elif args.json:
                    print(json.dumps(snap.to_json()), flush=True)  # one line each: JSON Lines
                else:
                    console.print(render(snap, expand=False))
                    console.file.flush()
                await asyncio.sleep(args.watch)
                snap = await _watched_snapshot(redis)
        with Live(render(snap, expand=terminal), console=console, screen=False, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(args.watch)
                snap = await _watched_snapshot(redis)
                live.update(snap if isinstance(snap, str) else render(snap, expand=terminal), refresh=True)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


async def _watched_snapshot(redis: AnyRedis) -> Snapshot | str:
    """A snapshot, or the line that says why there is none this time (the next read tries again). A refused
    password is no outage: no wait cures it, so it ends the command."""
    try:
        return await snapshot(redis)
    except AuthenticationError:
        raise
    except (RedisError, RedisClusterException, OSError) as e:
        return f"{time.strftime('%H:%M:%S')} Redis did not answer ({type(e).__name__}: {e}); trying again"
