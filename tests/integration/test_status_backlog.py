"""The backlog read from Redis alone: what waits and runs per lane and tenant, the gateway's gauges with no
worker at all (what wakes a pool scaled to zero and fires TokenqNoWorkers), and `tokenq status`."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import generate_latest

from gateway.backlog import read_backlog
from gateway.metrics import GatewayMetrics
from gateway.registry import Registry
from protocol import keys
from protocol.workers import WorkerHeartbeat
from tokenq.cli import build_parser
from tokenq.status import render, snapshot

MODEL = "m1"


async def _queue(redis, lane: str, tenant: str, n: int) -> str:
    """n entries on the tenant's stream, noted on the lane, as submit leaves them."""
    stream = keys.jobs_stream(MODEL, lane, tenant)
    for i in range(n):
        await redis.xadd(stream, {"job_id": f"{tenant}-{i}", "payload": "{}"})
    await redis.sadd(keys.lane_tenants_key(MODEL, lane), tenant)
    return stream


async def _take(redis, stream: str, n: int) -> None:
    """Worker host:1 reads n entries (pending, not acknowledged)."""
    await redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    await redis.xreadgroup(keys.GROUP, "host:1", {stream: ">"}, count=n)


async def _beat(redis, worker_id: str = "host:1") -> None:
    hb = WorkerHeartbeat(worker_id=worker_id, model=MODEL, max_model_len=2048, capacity=8, running=1,
                         kv_usage=0.25, tokens_per_s=42.0, generation_tokens=1000)
    await redis.set(keys.worker_key(worker_id), hb.model_dump_json(), ex=10)
    await redis.sadd(keys.WORKERS_SET, worker_id)


@pytest.mark.both_redis  # one redis-server and a three-node cluster (tests/conftest.py)
async def test_backlog_counts_waiting_and_running_per_tenant(redis_client):
    stream = await _queue(redis_client, "default", "a", 3)
    await _take(redis_client, stream, 1)
    await _queue(redis_client, "batch", "b", 1)  # no group yet: no worker ever read this lane
    rows = {(r.lane, r.tenant): r for r in await read_backlog(redis_client, now=time.time() + 5)}
    a, b = rows[("default", "a")], rows[("batch", "b")]
    assert (a.waiting, a.running, b.waiting, b.running) == (2, 1, 1, 0)
    assert a.oldest_waiting_s >= 5 and b.oldest_waiting_s >= 5
    await _take(redis_client, keys.jobs_stream(MODEL, "batch", "b"), 1)
    rows = {(r.lane, r.tenant): r for r in await read_backlog(redis_client)}
    assert rows[("batch", "b")].waiting == 0 and rows[("batch", "b")].oldest_waiting_s == 0.0


@pytest.mark.both_redis  # one redis-server and a three-node cluster (tests/conftest.py)
async def test_jobs_held_by_a_worker_that_is_gone_wait(redis_client):
    """Handed back at its worker's stop, or left by a crash until the lease lapses: no worker runs them, so
    they are waiting (with their age: the oldest-waiting alert sees them), not running, in the gauges and in
    `tokenq status`."""
    stream = await _queue(redis_client, "default", "a", 3)
    await _take(redis_client, stream, 2)  # no heartbeat of host:1 yet
    now = time.time() + 5
    gone = {(r.lane, r.tenant): r for r in await read_backlog(redis_client, now=now, live=set())}[("default", "a")]
    assert (gone.waiting, gone.running) == (3, 0) and gone.oldest_waiting_s >= 5
    alive = {(r.lane, r.tenant): r for r in await read_backlog(redis_client, now=now, live={"host:1"})}[("default", "a")]
    assert (alive.waiting, alive.running) == (1, 2)
    await _beat(redis_client)
    lane = (await snapshot(redis_client)).lanes[0]
    assert (lane["waiting"], lane["running"]) == (1, 2)
    await redis_client.delete(keys.worker_key("host:1"))  # its heartbeat lapses
    lane = (await snapshot(redis_client)).lanes[0]
    assert (lane["waiting"], lane["running"]) == (3, 0)


@pytest.mark.both_redis  # one redis-server and a three-node cluster (tests/conftest.py)
async def test_gateway_exports_the_backlog_with_no_worker(redis_client):
    await _queue(redis_client, "interactive", "a", 2)
    metrics = GatewayMetrics()
    await metrics.observe_backlog(redis_client, Registry(redis_client))
    text = generate_latest(metrics.registry).decode()
    assert f'tokenq_queue_waiting_jobs{{lane="interactive",model="{MODEL}",tenant="a"}} 2.0' in text
    assert f'tokenq_live_workers{{model="{MODEL}"}} 0.0' in text  # present, and zero: the alert can fire


async def test_gateway_exports_redis_memory_and_a_policy_set_at_runtime(redis_client):
    """An operator's CONFIG SET maxmemory-policy allkeys-lru, long after every role started (whose start-up
    warning saw noeviction), shows in the next scrape, where an alert can see it."""
    def sample(text: str, name: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(name))

    used = (await redis_client.info("memory"))["used_memory"]
    text = generate_latest_of(await _observed(redis_client))
    assert float(sample(text, "tokenq_redis_used_memory_bytes").split()[-1]) >= used / 2
    assert sample(text, "tokenq_redis_maxmemory_bytes") == "tokenq_redis_maxmemory_bytes 0.0"
    assert sample(text, "tokenq_redis_evicts") == 'tokenq_redis_evicts{policy="noeviction"} 0.0'
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        text = generate_latest_of(await _observed(redis_client))
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")
    assert sample(text, "tokenq_redis_evicts") == 'tokenq_redis_evicts{policy="allkeys-lru"} 1.0'


async def _observed(redis_client) -> GatewayMetrics:
    metrics = GatewayMetrics()
    await metrics.observe_backlog(redis_client, Registry(redis_client))
    return metrics


def generate_latest_of(metrics: GatewayMetrics) -> str:
    return generate_latest(metrics.registry).decode()


@pytest.mark.both_redis  # one redis-server and a three-node cluster (tests/conftest.py)
async def test_gateway_scrape_serves_the_backlog(redis_client):
    await _queue(redis_client, "default", "a", 1)
    await _beat(redis_client)
    response = await GatewayMetrics().scrape(redis_client, Registry(redis_client))
    text = response.body.decode()
    assert f'tokenq_live_workers{{model="{MODEL}"}} 1.0' in text
    assert "tokenq_queue_oldest_waiting_seconds" in text


@pytest.mark.both_redis  # one redis-server and a three-node cluster (tests/conftest.py)
async def test_status_snapshot_and_view(redis_client):
    from rich.console import Console

    stream = await _queue(redis_client, "default", "a", 3)
    await _take(redis_client, stream, 1)
    await _queue(redis_client, "default", "b", 1)
    await _beat(redis_client)
    snap = await snapshot(redis_client)
    assert snap.lanes == [{"model": MODEL, "lane": "default", "waiting": 3, "running": 1,
                           "oldest_waiting_s": pytest.approx(snap.lanes[0]["oldest_waiting_s"]), "tenants": 2}]
    assert snap.tokens_per_s == 42.0
    console = Console(record=True, width=160)
    console.print(render(snap))
    text = console.export_text()
    for expected in ("Lanes", "Tenants", "Workers (1 live, 42.0 output tokens/s in all)", "host:1", "1/8", "25%"):
        assert expected in text, expected


def test_status_json_from_the_command_line(redis_url, capsys):
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        r.flushdb()
        r.xadd(keys.jobs_stream(MODEL, "batch", "t"), {"job_id": "j", "payload": "{}"})
        r.sadd(keys.lane_tenants_key(MODEL, "batch"), "t")
    args = build_parser().parse_args(["status", "--redis-url", redis_url, "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lanes"][0]["waiting"] == 1 and out["workers"] == []
    args = build_parser().parse_args(["status", "--redis-url", redis_url])
    assert args.func(args) == 0
    assert "no live worker" in capsys.readouterr().out


def test_status_into_a_pipe_keeps_whole_names(redis_url, capsys):
    """A pipe has no width; the table keeps each name whole instead of cutting it to 80 columns."""
    import asyncio

    import redis.asyncio as aioredis

    worker_id = "gpu-node-0017.us-east-2.compute.internal:worker-3:pid-481516"

    async def beat() -> None:
        async with aioredis.Redis.from_url(redis_url, decode_responses=True) as r:
            await r.flushdb()
            await _beat(r, worker_id)

    asyncio.run(beat())
    args = build_parser().parse_args(["status", "--redis-url", redis_url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert worker_id in out and MODEL in out


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "soon"])
def test_watch_refuses_an_interval_that_would_spin(seconds, capsys):
    """`--watch 0` (or below) redrew in a tight loop, reading every lane and worker as fast as Redis answered."""
    from tokenq.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["status", "--watch", seconds])
    assert exit_.value.code == 2 and "--watch" in capsys.readouterr().err
    assert build_parser().parse_args(["status", "--watch", "0.5"]).watch == 0.5


@pytest.mark.parametrize("as_json", [True, False])
def test_watch_into_a_pipe_writes_each_snapshot_as_it_is_read(redis_url, as_json):
    """--watch with --json (or into a file) wrote one snapshot and stopped, or held everything until the end."""
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "tokenq", "status", "--redis-url", redis_url, "--watch", "0.5"]
    proc = subprocess.Popen(argv + (["--json"] if as_json else []), stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # written before the process ends
        time.sleep(1.2)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
    if as_json:
        snapshots = [json.loads(line) for line in [first, *rest.splitlines()] if line.strip()]
        assert len(snapshots) >= 2 and all("lanes" in s for s in snapshots)
    else:
        assert first.strip() and (first + rest).count("Workers (") + (first + rest).count("no live worker") >= 2


def test_status_says_when_redis_is_full(redis_url, capsys):
    """A full Redis (maxmemory reached, noeviction) refuses the live workers' heartbeats: status said only
    that there was no live worker, and nothing of the memory."""
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        r.flushdb()
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        try:
            args = build_parser().parse_args(["status", "--redis-url", redis_url])
            assert args.func(args) == 0
            out = capsys.readouterr().out
            assert "Redis: out of memory (used " in out and "of maxmemory 1B" in out, out
            assert "writes are refused; jobs wait and workers may read as gone until memory is freed" in out
            assert "no live worker" not in out and "Redis is full: it refuses their heartbeats" in out
            args = build_parser().parse_args(["status", "--redis-url", redis_url, "--json"])
            assert args.func(args) == 0
            memory = json.loads(capsys.readouterr().out)["redis_memory"]
        finally:
            r.config_set("maxmemory", "0")
    assert memory["full"] and memory["maxmemory"] == 1 and memory["used_memory"] > 1, memory
    assert memory["maxmemory_policy"] == "noeviction"
    args = build_parser().parse_args(["status", "--redis-url", redis_url])
    assert args.func(args) == 0
    assert "out of memory" not in capsys.readouterr().out


async def test_a_redis_that_refuses_info_leaves_the_memory_line_out():
    """An ACL user without INFO (some managed Redis): status ended at that error; it shows the rest."""
    from redis.exceptions import ResponseError

    from jobstore.memory import read_memory

    class NoInfo:
        async def info(self, section: str) -> dict:
            raise ResponseError("NOPERM this user has no permissions to run the 'info' command")

    assert await read_memory(NoInfo()) is None
