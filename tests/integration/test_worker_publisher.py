"""Publisher and serve() pieces against a real Redis, without the whole service where possible."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY

from jobstore import JobStore, runner, scripts
from jobstore.scripts import Script
from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobPayload, new_job_id
from protocol.sampling import SamplingParams
from tests.conftest import free_port
from tests.fakes import FakeEngine, started_intake, submit_job
from tests.integration import test_worker_service as svc
from worker.engine.outputs import RequestOutput
from worker.engine_loop import EngineLoop
from worker.publisher import Publisher, RunningJob

MODEL = "pub-model"


def payload(prompt: list[int]) -> JobPayload:
    return JobPayload(id=new_job_id(MODEL), model=MODEL, kind="chat", prompt_token_ids=prompt,
                      sampling=SamplingParams(max_tokens=4))


async def test_second_final_write_is_dropped_and_counted(redis_client):
    r = redis_client
    p = payload([1, 2])
    await submit_job(r, p)
    stream = keys.jobs_stream(MODEL, "default", "default")
    await r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    [[_, [(entry_id, _)]]] = await r.xreadgroup(keys.GROUP, "c", {stream: ">"}, count=1)
    await r.hset(keys.job_key(p.id), mapping={f.STATE: "succeeded", f.RESULT: "{}"})  # someone else won

    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL)
    pub.track(RunningJob(payload=p, stream=stream, entry_id=entry_id, streamed=False, seq=0,
                         started_at=time.time()))
    before = REGISTRY.get_sample_value("tokenq_duplicate_final_writes_total", {"model": MODEL}) or 0.0
    await pub.publish([RequestOutput(p.id, [1], "t1 ", finished=True, finish_reason="stop")])
    after = REGISTRY.get_sample_value("tokenq_duplicate_final_writes_total", {"model": MODEL})
    assert after == before + 1
    h = await r.hgetall(keys.job_key(p.id))
    assert h[f.RESULT] == "{}" and not await r.exists(keys.job_text_key(p.id))  # untouched
    assert await r.xlen(stream) == 0 and len(pub) == 0


async def test_intake_start_counts_attempts_and_keeps_seq(redis_client):
    """A rerun (the job was reclaimed) bumps attempts, clears the old text, keeps seq increasing."""
    r = redis_client
    p = payload([1, 2, 3])
    await submit_job(r, p, streamed=True)
    await r.hset(keys.job_key(p.id), mapping={f.STATE: "running", f.ATTEMPTS: 1, f.SEQ: 5})
    await r.set(keys.job_text_key(p.id), "old")
    async with started_intake(r, MODEL) as (intake, pub, _):
        assert await intake.poll() == 1
        job = pub.jobs[p.id]
        assert job.seq == 5 and job.streamed
        h = await JobStore(r).read(p.id)
        assert h[f.ATTEMPTS] == "2" and f.TEXT not in h and h[f.WORKER] == "host:1"


async def test_start_script_goes_out_on_the_connection_for_scripts(redis_client):
    """A new job's first output waits for its start script: it goes out where the publisher's scripts do (the
    worker's shared connection), not through a redis-py pipeline."""
    r = redis_client
    sent: list[Script] = []

    class Recording:
        async def evalsha(self, script: Script, keys_, args):
            sent.append(script)
            return await runner.run(r, script, keys_, args)

    p = payload([1, 2])
    await submit_job(r, p)
    async with started_intake(r, MODEL, scripts=Recording()) as (intake, pub, _):
        assert await intake.poll() == 1
        assert p.id in pub.jobs and sent == [scripts.START]


async def test_first_token_metric_is_observed_after_the_delta_is_written(redis_client):
    """The first delta goes to Redis before the worker spends time on metrics."""
    r = redis_client
    p = payload([1, 2])
    await submit_job(r, p, streamed=True)
    sample = ("tokenq_worker_time_to_first_token_seconds_count", {"model": MODEL, "lane": "default"})
    before = REGISTRY.get_sample_value(*sample) or 0.0
    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL)
    pub.track(RunningJob(payload=p, stream="s", entry_id="0-1", streamed=True, seq=0, started_at=time.time()))
    seen_at_write: list[float] = []
    write = pub.store.write

    async def recording_write(deltas, finals):
        seen_at_write.append(REGISTRY.get_sample_value(*sample) or 0.0)
        return await write(deltas, finals)

    pub.store.write = recording_write  # type: ignore[method-assign]
    await pub.publish([RequestOutput(p.id, [7], "t7 ", num_output_tokens=1, produced_at=time.time())])
    assert seen_at_write == [before]
    assert REGISTRY.get_sample_value(*sample) == before + 1
    assert await r.get(keys.job_text_key(p.id)) == "t7 "


async def test_metrics_endpoint(redis_url, redis_client):
    port = free_port()
    p = svc.payload([1, 2, 3])
    await submit_job(redis_client, p)
    async with svc.running(redis_url, FakeEngine(), metrics_port=port):
        await svc.final_state(redis_client, p.id)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'tokenq_worker_requests_finished_total{model="fake-model",reason="stop"}' in body
    assert "tokenq_worker_time_to_first_token_seconds_bucket" in body


SERVE = """
import sys
from protocol.workers import ModelCard
from tests.fakes import FakeEngine
from worker.service import serve
serve(sys.argv[1], "serve-model", FakeEngine(), ModelCard(name="serve-model", max_model_len=64,
      tokenizer_json=""), worker_id="serve-host:1", grace_s=1.0)
"""


async def test_serve_stops_on_sigterm(redis_url, redis_client):
    r = redis_client
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, redis_url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not await r.exists(keys.worker_key("serve-host:1")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()
    assert rc == 0, out
    assert not await r.exists(keys.worker_key("serve-host:1"))
    assert '"worker stopped"' in out or "worker stopped" in out


async def test_deltas_keep_non_ascii_text_exact(redis_client):
    """The batched delta script goes through Redis's cjson: multi-byte UTF-8 and characters outside the
    BMP must reach both the hash and the channel byte for byte, for every job of the batch."""
    from protocol.events import DeltaEvent, parse_event

    r = redis_client
    texts = ["héllo wörld ", "数学 ", "emoji 😀🚀 and \"quotes\" \\ back\nslash "]
    jobs = []
    for _ in texts:
        p = payload([1, 2])
        await submit_job(r, p, streamed=True)
        jobs.append(p)
    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL)
    for p in jobs:
        pub.track(RunningJob(payload=p, stream="s", entry_id="0-1", streamed=True, seq=0, started_at=time.time()))
    pubsub = r.pubsub()
    await pubsub.subscribe(*(keys.events_channel(p.id) for p in jobs))
    await pub.publish([RequestOutput(p.id, [7], t) for p, t in zip(jobs, texts, strict=True)])
    got: dict[str, DeltaEvent] = {}
    deadline = time.monotonic() + 5
    while len(got) < len(jobs) and time.monotonic() < deadline:
        m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if m and m["type"] == "message":
            got[m["channel"]] = parse_event(m["data"])
    await pubsub.aclose()
    for p, text in zip(jobs, texts, strict=True):
        h = await JobStore(r).read(p.id)
        assert h[f.TEXT] == text and int(h[f.SEQ]) == 1 and f.FIRST_TOKEN_AT in h
        event = got[keys.events_channel(p.id)]
        assert isinstance(event, DeltaEvent) and event.text == text and event.offset == 0 and event.seq == 1


async def test_heartbeat_reports_queue_depth_over_every_tenant_stream(redis_client):
    """Autoscaling reads tokenq_queue_depth: the sum over tenants' streams per lane, not one stream."""
    from protocol.workers import ModelCard
    from worker.heartbeat import Heartbeat

    r = redis_client
    model = "depth-model"
    plan = [("default", "acme", 3), ("default", "globex", 2), ("batch", "acme", 4)]
    for lane, tenant, n in plan:
        for _ in range(n):
            p = JobPayload(id=new_job_id(model), model=model, kind="chat", prompt_token_ids=[1], tenant=tenant,
                           lane=lane, sampling=SamplingParams(max_tokens=4))
            await submit_job(r, p)
    card = ModelCard(name=model, max_model_len=64, tokenizer_json="{}")
    beat = Heartbeat(r, "w-depth", card, EngineLoop(FakeEngine()), capacity=8)
    await beat.beat()
    depth = await beat.observe_queue_depth()
    assert depth == {"interactive": 0, "default": 5, "batch": 4}
    for lane, n in depth.items():
        assert REGISTRY.get_sample_value("tokenq_queue_depth", {"model": model, "lane": lane}) == n


async def test_outputs_before_the_start_answer_wait_for_it(redis_client):
    """Intake hands a job to the engine before its start script answers. Outputs that come first are held,
    then published in order once the job is tracked; a job the script refused publishes nothing."""
    r = redis_client
    kept, refused = payload([1, 2]), payload([3])
    for p in (kept, refused):
        await submit_job(r, p, streamed=True)
    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL)
    pub.expect(kept.id)
    pub.expect(refused.id)
    assert pub.has(kept.id)
    await pub.publish([RequestOutput(kept.id, [1], "t1 "), RequestOutput(refused.id, [3], "t3 ")])
    for p in (kept, refused):
        assert not await r.exists(keys.job_text_key(p.id))  # held, not written
    pub.unexpect(refused.id)
    pub.track(RunningJob(payload=kept, stream="s", entry_id="0-1", streamed=True, seq=0, started_at=time.time()))
    await pub.publish([RequestOutput(kept.id, [2], "t2 ", finished=True, finish_reason="stop",
                                     num_prompt_tokens=2, num_output_tokens=2)])
    h = await r.hgetall(keys.job_key(kept.id))
    assert h[f.STATE] == "succeeded" and '"text":"t1 t2 "' in h[f.RESULT].replace('": "', '":"')
    assert not await r.exists(keys.job_text_key(refused.id))
    assert not pub.has(refused.id)


async def test_intake_withdraws_jobs_whose_start_script_fails(redis_client):
    """The engine gets the job, then the start script's write fails: the job is taken back from the engine
    and the publisher, and its entry stays pending for recovery to hand out again."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    r = redis_client
    p = JobPayload(id=new_job_id(MODEL), model=MODEL, kind="chat", prompt_token_ids=list(range(1, 40)),
                   sampling=SamplingParams(max_tokens=1000))
    await submit_job(r, p)
    engine = FakeEngine()
    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid), abort(rid))[1]
    async with started_intake(r, MODEL, engine) as (intake, pub, _):
        async def failing_start(payloads, now):
            await asyncio.sleep(0.05)  # long enough for the engine thread to have applied the add
            raise RedisConnectionError("lost")

        intake._start_all = failing_start
        with pytest.raises(RedisConnectionError):
            await intake.poll()
        deadline = time.monotonic() + 5
        while not aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [a for a, _ in engine.added] == [p.id] and aborted == [p.id] and not engine.requests
        assert not pub.has(p.id)
        pending = await r.xpending(keys.jobs_stream(MODEL, "default", "default"), keys.GROUP)
        assert pending["pending"] == 1


async def test_intake_aborts_a_job_whose_start_is_refused(redis_client):
    """A job cancelled while queued: the engine got it before the start script said so, and drops it."""
    r = redis_client
    p = JobPayload(id=new_job_id(MODEL), model=MODEL, kind="chat", prompt_token_ids=list(range(1, 40)),
                   sampling=SamplingParams(max_tokens=1000))  # runs ~80 ms in the fake engine: still there
    await submit_job(r, p)
    await r.hset(keys.job_key(p.id), f.STATE, "cancelled")
    engine = FakeEngine()
    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid), abort(rid))[1]
    async with started_intake(r, MODEL, engine) as (intake, pub, _):
        assert await intake.poll() == 1
        deadline = time.monotonic() + 5
        while not aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [a for a, _ in engine.added] == [p.id] and aborted == [p.id] and not engine.requests
        assert not pub.has(p.id)
        assert await r.xlen(keys.jobs_stream(MODEL, "default", "default")) == 0  # acknowledged and deleted


async def test_intake_cancelled_before_the_start_script_answers_withdraws_the_job(redis_client):
    """A worker stopping while the job's start script is in flight (the job already in the engine): the job
    leaves the engine and the publisher, its start never took effect, and its entry stays pending."""
    r = redis_client
    p = JobPayload(id=new_job_id(MODEL), model=MODEL, kind="chat", prompt_token_ids=list(range(1, 9)),
                   sampling=SamplingParams(max_tokens=8))
    await submit_job(r, p)
    engine = FakeEngine(step_sleep=0.5)  # the first step (the "launch") outlasts the cancellation
    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid), abort(rid))[1]
    async with started_intake(r, MODEL, engine) as (intake, pub, _):
        async def slow_start(payloads, now):  # Redis slow to answer: the cancellation comes first
            await asyncio.sleep(5)

        intake._start_all = slow_start
        await asyncio.sleep(0.01)
        poll = asyncio.create_task(intake.poll())
        await asyncio.sleep(0.1)
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        assert not pub.has(p.id)
        deadline = time.monotonic() + 5
        while not aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert aborted == [p.id]
        assert (await r.hgetall(keys.job_key(p.id)))[f.STATE] == "queued"  # no start script
        pending = await r.xpending(keys.jobs_stream(MODEL, "default", "default"), keys.GROUP)
        assert pending["pending"] == 1


@pytest.mark.parametrize("on_pipe", [True, False], ids=["worker-pipe", "redis-py"])
async def test_writes_refused_by_a_full_redis_wait_for_memory_and_lose_nothing(redis_client, on_pipe):
    """A full Redis (maxmemory, noeviction) refuses every write. The step's deltas were dropped silently and
    a final write logged and lost, so the job's text lost tokens and it ran again after its lease; now the
    publisher holds the step and retries, as in an outage, and the job ends once, whole."""
    from jobstore.pipe import RedisPipe

    r = redis_client
    p = payload([1, 2])
    await submit_job(r, p, streamed=True)
    pipe = RedisPipe(r, 3, 2.0) if on_pipe else None
    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL, scripts=pipe)
    pub.track(RunningJob(payload=p, stream="s", entry_id="0-1", streamed=True, seq=0, started_at=time.time()))
    await r.config_set("maxmemory-policy", "noeviction")
    await r.config_set("maxmemory", "1")
    try:
        first = asyncio.create_task(pub.publish([RequestOutput(p.id, [7], "t7 ", num_output_tokens=1)]))
        await asyncio.sleep(0.5)
        assert not first.done()  # still retrying: nothing dropped
        assert (await JobStore(r).read(p.id))[f.STATE] == "queued"  # and the job reads while Redis is full
    finally:
        await r.config_set("maxmemory", "0")
    await asyncio.wait_for(first, 10)
    await pub.publish([RequestOutput(p.id, [8], "t8", num_output_tokens=2, finished=True, finish_reason="stop")])
    record = await JobStore(r).read(p.id)
    assert record[f.STATE] == "succeeded" and record[f.TEXT] == "t7 t8" and record.get(f.ATTEMPTS, "0") in ("0", "1")
    if pipe is not None:
        await pipe.aclose()


async def test_a_final_write_refused_alone_by_a_full_redis_is_written_once_it_takes_writes(redis_client):
    """Memory can fill between a MULTI's queueing and its EXEC (or a cluster sends the scripts one by one):
    then the final write's own reply is the refusal. It was logged as failed and the job ran again after its
    lease; now it waits for Redis, as a refused step does."""
    from redis.exceptions import OutOfMemoryError

    r = redis_client
    p = payload([1, 2])
    await submit_job(r, p)
    pub = Publisher(r, EngineLoop(FakeEngine()), MODEL)
    pub.track(RunningJob(payload=p, stream="s", entry_id="0-1", streamed=False, seq=0, started_at=time.time()))
    write, refusals = pub.store.write, [OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'")] * 2

    async def filling_write(deltas, finals):
        if finals and refusals:
            refusals.pop()
            return [OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")]
        return await write(deltas, finals)

    pub.store.write = filling_write  # type: ignore[method-assign]
    await pub.publish([RequestOutput(p.id, [7], "t7", num_output_tokens=1, finished=True, finish_reason="stop")])
    assert not refusals
    record = await JobStore(r).read(p.id)
    assert record[f.STATE] == "succeeded" and len(pub) == 0
