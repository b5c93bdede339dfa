"""The Batch API end to end with the official openai client: a real gateway (uvicorn), the fake worker,
and the feeder on a thread."""

from __future__ import annotations

import json
import time

import openai
import pytest
import redis

from batches import keys as K
from protocol import keys
from tests.batch_helpers import (
    FINAL,
    ThreadedFeeder,
    assert_each_once,
    chat_lines,
    completion_lines,
    fast_settings,
    jsonl,
    result_lines,
    upload,
    wait_batch,
)
from tests.integration.fake_worker import MODEL, ThreadedFakeWorker
from tests.processes import GatewayThread


def feeder_counts() -> dict[str, float]:
    """The feeder's counters as its /metrics shows them (the feeders here run in this process)."""
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    return {"output": value("tokenq_batch_lines_total", file="output"),
            "error": value("tokenq_batch_lines_total", file="error"),
            **{status: value("tokenq_batches_ended_total", status=status) for status in ("completed", "cancelled")},
            "jobs_cancelled": value("tokenq_batch_jobs_ended_total", model=MODEL, reason="cancelled")}


def counted_since(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in feeder_counts().items()}


def api_key_of(redis_url: str, tenant: str, limits: dict[str, int]) -> str:
    """A new key of `tenant`, which takes these limits."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.apikeys import create_key

    async def create() -> str:
        ar = aioredis.from_url(redis_url, decode_responses=True)
        try:
            return (await create_key(ar, tenant, limits)).api_key
        finally:
            await ar.aclose()

    return asyncio.run(create())


@pytest.fixture
def base_url(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def worker(base_url, redis_url, default_model_dir):
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=16) as w:
        yield w


def test_openai_client_round_trip(client, worker, redis_url):
    lines = chat_lines(12, MODEL)
    lines[5]["body"]["messages"][0]["content"] = "please FAIL_ME now"
    with ThreadedFeeder(redis_url):
        f = upload(client, lines)
        assert f.purpose == "batch" and f.status == "processed" and f.bytes == len(jsonl(lines))
        assert client.files.retrieve(f.id).filename == "in.jsonl"
        assert client.files.content(f.id).text == jsonl(lines).decode()
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"run": "test"})
        assert batch.status == "validating" and batch.metadata == {"run": "test"}
        batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 12
    assert (batch.request_counts.completed, batch.request_counts.failed) == (11, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out, err = result_lines(client, batch)
    assert_each_once([line["custom_id"] for line in lines], out, err)
    by_id = {line["custom_id"]: line for line in out}
    first = by_id["req-0"]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["body"]["choices"][0]["message"]["content"]
    assert first["response"]["request_id"].startswith("job_")
    assert [e["custom_id"] for e in err] == ["req-5"] and err[0]["response"]["status_code"] == 500
    # Each output line's body carries its usage; the batch's usage is their sum (the failed line adds none).
    usages = [line["response"]["body"]["usage"] for line in out]
    assert all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
               and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert batch.usage.input_tokens_details.cached_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert [b.id for b in client.batches.list()] == [batch.id]
    ids = {x.id for x in client.files.list()}
    assert {f.id, batch.output_file_id, batch.error_file_id} <= ids
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_retention_settings_the_sdk_sends_are_refused_not_ignored(client):
    """OpenAI's expires_after (a file's) and output_expires_after (a batch's): a team that asks for an hour's
    retention must not have its prompts kept 30 days without a word."""
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("in.jsonl", jsonl(chat_lines(1, MODEL))), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert e.value.param == "expires_after" and e.value.code == "unsupported_field"
    assert client.files.list().data == []
    f = upload(client, chat_lines(1, MODEL))
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 3600})
    assert e.value.param == "output_expires_after" and e.value.code == "unsupported_field"
    assert client.batches.list().data == []


@pytest.mark.parametrize(("content", "line", "words"), [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
     b'"messages": [{"role": "user", "content": "hi"}]}}\n\n{not json}\n', 3, "not valid JSON"),
    (jsonl(chat_lines(2, MODEL)) + jsonl(chat_lines(1, MODEL)), 3, "custom_id 'req-0' is used by an earlier line"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n', 1, "method"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n', 1, "url"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n', 1,
     "body.messages"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x", '
     b'"stream": true}}\n', 1, "body.stream"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", '
     b'"prompt": ["x", "y"]}}\n', 1, "body.prompt: a batch line takes one prompt (got 2)"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", 1, "not valid JSON: it nests deeper than the JSON parser goes"),
])
def test_bad_lines_are_refused_by_number(client, content, line, words):
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, content)
    assert f"line {line}:" in e.value.message and words in e.value.message, e.value.message
    assert e.value.code == "invalid_batch_line" and e.value.param == "file"
    assert client.files.list().data == []


def test_upload_limits(redis_url, monkeypatch):
    redis.Redis.from_url(redis_url).flushdb()
    monkeypatch.setenv("TOKENQ_BATCH_MAX_LINES", "3")
    monkeypatch.setenv("TOKENQ_BATCH_MAX_FILE_BYTES", "2000")
    with GatewayThread(redis_url) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            upload(client, chat_lines(4, MODEL))
        assert "line 4: a batch file holds at most 3 requests" in e.value.message
        with pytest.raises(openai.APIStatusError) as e:
            upload(client, chat_lines(3, MODEL, words=300))
        assert e.value.status_code == 413 and "limit of 2000 bytes" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("x.jsonl", jsonl(chat_lines(1, MODEL))), purpose="fine-tune")
        assert "purpose" in e.value.message
        assert upload(client, chat_lines(3, MODEL)).status == "processed"
    assert not [k for k in redis.Redis.from_url(redis_url).keys("tokenq:file:*:lines")
                if redis.Redis.from_url(redis_url).ttl(k) < 3600]


def test_endpoint_mismatch_fails_the_batch_naming_the_line(client):
    lines = chat_lines(3, MODEL)
    f = upload(client, lines)
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].line == 1
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")


def test_window_bounds_the_lane_and_identical_greedy_lines_run_once(client, redis_url, default_model_dir):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    lines = completion_lines(60, MODEL, temperature=0)
    for line in lines[40:]:  # 20 lines with the body of line 0
        line["body"] = dict(lines[0]["body"])
    depth = []
    before = feeder_counts()
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.01, capacity=4), \
            ThreadedFeeder(redis_url, fast_settings(window=8, refill=2)):
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/completions",
                                      completion_window="24h")
        while client.batches.retrieve(batch.id).status not in ("completed", "failed"):
            depth.append(r.hlen(K.inflight_key(batch.id)) + r.hlen(K.copies_key(batch.id)))
            time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 60
    assert counted_since(before) == {"output": 60, "error": 0, "completed": 1, "cancelled": 0, "jobs_cancelled": 0}
    assert max(depth) <= 8 and max(depth) >= 4
    jobs = r.keys(keys.job_keys_pattern(f"{batch.id.removeprefix('batch_')}_*"))
    assert len(jobs) == 40  # the 20 copies of line 0 ran as line 0's one job
    out, err = result_lines(client, batch)
    assert_each_once([line["custom_id"] for line in lines], out, err)
    text = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in out}
    assert all(text[f"req-{i}"] == text["req-0"] for i in range(40, 60))
    assert len(set(text.values())) == 40
    # A copy's line reports the usage of the line it copies, and counts in the batch's usage like it.
    completion = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    assert batch.usage.output_tokens == completion > 0


@pytest.mark.parametrize("window", [4, 64])  # lines still to feed; every line fed already
def test_cancel(client, redis_url, default_model_dir, window):
    """Lines not fed and queued jobs end `batch_cancelled` at once (no waiting out the grace period)."""
    lines = chat_lines(40, MODEL, max_tokens=20, words=20)
    before = feeder_counts()
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.05, capacity=2), \
            ThreadedFeeder(redis_url, fast_settings(window=window, refill=1, cancel_grace_s=600)):
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_batch(client, batch.id, until=("in_progress",))
        time.sleep(1.0)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    out, err = result_lines(client, batch)
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert len(err) > 30 and {e["error"]["code"] for e in err if e["error"]} == {"batch_cancelled"}
    assert client.batches.cancel(batch.id).status == "cancelled"
    counted = counted_since(before)
    assert (counted["output"], counted["error"], counted["cancelled"]) == (len(out), len(err), 1)
    # Every line was fed at window 64: the queued ones' jobs are the feeder's to end (at 4, most were never fed).
    assert counted["jobs_cancelled"] > (20 if window == 64 else -1)


def test_expiry(client, redis_url, default_model_dir):
    lines = chat_lines(40, MODEL, max_tokens=20, words=20)
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.05, capacity=2), \
            ThreadedFeeder(redis_url, fast_settings(window=4, refill=1)):
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="2s")
        batch = wait_batch(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    out, err = result_lines(client, batch)
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert len(err) > 30 and {e["error"]["code"] for e in err} == {"batch_expired"}
    assert batch.request_counts.failed == len(err) and batch.request_counts.completed == len(out)


def test_a_window_smaller_than_the_refill_still_feeds(client, redis_url, default_model_dir):
    lines = completion_lines(10, MODEL, max_tokens=2)
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=4), \
            ThreadedFeeder(redis_url, fast_settings(window=3, refill=64)):
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/completions",
                                      completion_window="24h")
        batch = wait_batch(client, batch.id, timeout=60)
    assert batch.status == "completed" and batch.request_counts.completed == 10


def test_a_new_batch_wakes_an_idle_feeder(client, redis_url, default_model_dir):
    """The feeder scans for batches only every poll (30 s here); a new batch is announced and taken at once."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=4), \
            ThreadedFeeder(redis_url, fast_settings(poll_s=30.0)):
        deadline = time.monotonic() + 30
        while r.pubsub_numsub(K.NEW_BATCHES)[0][1] < 1:  # the feeder has made its first scan and listens
            assert time.monotonic() < deadline, "the feeder never subscribed to new batches"
            time.sleep(0.02)
        batch = client.batches.create(input_file_id=upload(client, completion_lines(2, MODEL)).id,
                                      endpoint="/v1/completions", completion_window="24h")
        # Generous next to the poll's 30 s: a feeder that waited for its scan would miss it by far.
        batch = wait_batch(client, batch.id, timeout=10, until=("in_progress", *FINAL))
    assert batch.status in ("in_progress", "completed")


def test_a_feeder_killed_mid_batch_is_replaced_and_each_line_lands_once(client, redis_url, default_model_dir):
    lines = completion_lines(80, MODEL, max_tokens=3)
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.01, capacity=8):
        with ThreadedFeeder(redis_url, fast_settings(window=16, refill=4), owner="first") as first:
            batch = client.batches.create(input_file_id=upload(client, lines).id,
                                          endpoint="/v1/completions", completion_window="24h")
            deadline = time.monotonic() + 60
            while client.batches.retrieve(batch.id).request_counts.completed < 20:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            first.stop(abrupt=True)
        with ThreadedFeeder(redis_url, fast_settings(window=16, refill=4), owner="second"):
            batch = wait_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 80
    out, err = result_lines(client, batch)
    assert not err
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert len({json.dumps(o["response"]["body"]["choices"]) for o in out}) == 80


def test_files_and_batches_belong_to_their_tenant_and_count_against_its_quota(redis_url, monkeypatch):
    redis.Redis.from_url(redis_url).flushdb()
    acme_key, other_key = api_key_of(redis_url, "acme", {}), api_key_of(redis_url, "other", {})
    lines = chat_lines(3, MODEL)
    monkeypatch.setenv("TOKENQ_FILES_QUOTA_BYTES", str(len(jsonl(lines)) * 2))
    with GatewayThread(redis_url) as url:
        acme = openai.OpenAI(base_url=f"{url}/v1", api_key=acme_key, max_retries=0)
        other = openai.OpenAI(base_url=f"{url}/v1", api_key=other_key, max_retries=0)
        f = upload(acme, lines)
        batch = acme.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                     lambda: other.files.delete(f.id), lambda: other.batches.retrieve(batch.id),
                     lambda: other.batches.cancel(batch.id),
                     lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h")):
            with pytest.raises(openai.NotFoundError):
                call()
        assert other.files.list().data == [] and other.batches.list().data == []
        second = upload(acme, lines)
        with pytest.raises(openai.BadRequestError) as e:
            upload(acme, lines)
        assert "quota" in e.value.message
        assert upload(other, lines).status == "processed"  # the quota is per tenant
        acme.files.delete(second.id)  # (not f: the batch, which no feeder runs here, still reads it)
        assert upload(acme, lines).status == "processed"  # deleting gave the bytes back


def test_cli_submit_wait_status_results(base_url, worker, redis_url, tmp_path, capsys):
    from tokenq.cli import build_parser

    lines = chat_lines(5, MODEL)
    lines[2]["body"]["messages"][0]["content"] = "FAIL_ME"
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(lines))

    def run(*argv: str) -> int:
        args = build_parser().parse_args(["batch", "--url", base_url, *argv])
        try:
            return args.func(args)
        except SystemExit as e:  # the CLI's own errors
            return e.code

    with ThreadedFeeder(redis_url):
        assert run("submit", str(path), "--wait") == 0
    batch_id = capsys.readouterr().out.strip().splitlines()[-1]
    out = [json.loads(x) for x in (tmp_path / "in.output.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "in.errors.jsonl").read_text().splitlines()]
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert [e["custom_id"] for e in err] == ["req-2"]
    assert run("status", batch_id) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert run("results", batch_id, "-o", str(tmp_path / "again.jsonl")) == 0
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "in.output.jsonl").read_text()
    assert (tmp_path / "again.errors.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(lines[:1]) + b"{oops\n")
    assert "line 2" in str(run("submit", str(bad)))
    assert "missing.jsonl: no such file" in str(run("submit", str(tmp_path / "missing.jsonl")))
    args = build_parser().parse_args(["batch", "--url", "http://127.0.0.1:1", "status", batch_id])
    with pytest.raises(SystemExit, match="cannot reach the gateway at http://127.0.0.1:1"):
        args.func(args)


def test_the_tenants_limits_pace_its_batch(redis_url, default_model_dir):
    """A line over the tenant's rate limit waits (it is not failed) and runs once the limit allows."""

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    api_key = api_key_of(redis_url, "acme", {"rpm": 4})
    lines = completion_lines(10, MODEL, max_tokens=3)
    with GatewayThread(redis_url) as url, ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.02, capacity=8), \
            ThreadedFeeder(redis_url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 30
        while client.batches.retrieve(batch.id).request_counts.completed < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2.5)  # past the feeder's retries
        paced = client.batches.retrieve(batch.id)
        jobs = len(r.keys(keys.job_keys_pattern(f"{batch.id.removeprefix('batch_')}_*")))
        r.hdel(keys.tenant_key("acme"), "rpm")
        batch = wait_batch(client, batch.id, timeout=60)
        out, err = result_lines(client, batch)
    assert (paced.status, paced.request_counts.completed, paced.request_counts.failed, jobs) == (
        "in_progress", 4, 0, 4)
    assert batch.status == "completed" and batch.request_counts.completed == 10
    assert_each_once([line["custom_id"] for line in lines], out, err)


def test_a_file_saved_with_a_byte_order_mark_keeps_every_custom_id(client, worker, redis_url):
    """Windows editors start UTF-8 files with a BOM; `cat` of two such files puts one mid-file."""
    lines = chat_lines(4, MODEL)
    content = b"\xef\xbb\xbf" + jsonl(lines[:2]) + b"\xef\xbb\xbf" + jsonl(lines[2:])
    with ThreadedFeeder(redis_url):
        f = upload(client, content)
        batch = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                         completion_window="24h").id)
    out, err = result_lines(client, batch)
    assert batch.status == "completed" and err == []
    assert_each_once([line["custom_id"] for line in lines], out, err)


def test_a_file_stored_with_its_byte_order_mark_runs_every_line(client, worker, redis_url):
    """A file uploaded before the upload dropped the mark keeps it on its first stored line: the feeder reads
    that line as the upload does (it failed as not valid JSON, with no custom_id)."""
    lines = chat_lines(3, MODEL)
    f = upload(client, lines)
    stored = redis.Redis.from_url(redis_url, decode_responses=True)
    stored.hset(K.file_lines_key(f.id), "0", "\ufeff" + stored.hget(K.file_lines_key(f.id), "0"))
    with ThreadedFeeder(redis_url):
        batch = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                         completion_window="24h").id)
    out, err = result_lines(client, batch)
    assert batch.status == "completed" and err == []
    assert_each_once([line["custom_id"] for line in lines], out, err)


def test_a_file_not_in_utf8_is_refused_at_upload(client):
    """json.loads takes UTF-16 bytes, but the line could not be read back as text: before this check such a
    file was taken and its batch never ended."""
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, jsonl(chat_lines(1, MODEL)).decode().encode("utf-16"))
    assert "line 1: not UTF-8 text" in e.value.message and e.value.param == "file"
    assert client.files.list().data == []


def test_the_input_of_a_running_batch_cannot_be_deleted(client, redis_url, default_model_dir):
    lines = chat_lines(20, MODEL, max_tokens=20, words=20)
    f = upload(client, lines)
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.02, capacity=2), \
            ThreadedFeeder(redis_url, fast_settings(window=4, refill=1)):
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_batch(client, batch.id, until=("in_progress",))
        with pytest.raises(openai.ConflictError) as e:
            client.files.delete(f.id)
        assert batch.id in e.value.message and e.value.code == "file_in_use"
        batch = wait_batch(client, batch.id)
    out, err = result_lines(client, batch)
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert client.files.delete(f.id).deleted


def test_a_cursor_not_in_the_list_is_refused_not_read_as_the_start(client):
    files = [upload(client, chat_lines(1, MODEL)) for _ in range(3)]
    client.files.delete(files[1].id)
    for page in (lambda: client.files.list(after=files[1].id, limit=2),
                 lambda: client.batches.list(after="batch_doesnotexist", limit=2)):
        with pytest.raises(openai.BadRequestError) as e:
            page()
        assert e.value.param == "after"
    assert [x.id for x in client.files.list(after=files[2].id, limit=2)] == [files[0].id]


def test_a_file_of_any_name_downloads(client, base_url):
    import httpx

    f = client.files.create(file=("données 文件.jsonl", jsonl(chat_lines(1, MODEL))), purpose="batch")
    r = httpx.get(f"{base_url}/v1/files/{f.id}/content")
    assert r.status_code == 200 and json.loads(r.text)["custom_id"] == "req-0"
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"donn_es __.jsonl\"; filename*=UTF-8''donn%C3%A9es%20%E6%96%87%E4%BB%B6.jsonl")


@pytest.mark.parametrize(("field", "value", "param"), [("metadata", '{"k": "\\ud800"}', "metadata.k"),
                                                      ("input_file_id", '"\\ud800"', "input_file_id")])
def test_a_lone_surrogate_in_a_batch_is_refused_naming_its_field(client, base_url, field, value, param):
    """Such metadata was stored, and then every read of the batch (list, retrieve, cancel) was a 500; such a
    file id was a 500 at once."""
    import httpx

    fields = {"input_file_id": json.dumps(upload(client, chat_lines(1, MODEL)).id),
              "endpoint": '"/v1/chat/completions"', field: value}
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    r = httpx.post(f"{base_url}/v1/batches", content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "surrogate" in r.json()["error"]["message"]
    assert client.batches.list().data == []


def test_a_batch_of_an_unknown_file_names_input_file_id(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.param == "input_file_id" and "file-nope" in e.value.message


def test_cancel_ends_lines_a_limit_held_back_at_once(redis_url, default_model_dir):
    """Lines that a tenant's max_queued kept out of the queue were never run: the cancel's grace period,
    which lets running lines report, is not theirs to wait out."""
    redis.Redis.from_url(redis_url).flushdb()
    api_key = api_key_of(redis_url, "slow", {"max_queued": 2})
    lines = chat_lines(12, MODEL, max_tokens=20, words=20)
    with GatewayThread(redis_url) as url, ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.05, capacity=2), \
            ThreadedFeeder(redis_url, fast_settings(window=8, refill=1, cancel_grace_s=600)):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_batch(client, batch.id, until=("in_progress",))
        time.sleep(0.5)
        client.batches.cancel(batch.id)
        batch = wait_batch(client, batch.id, timeout=60)  # not the 600 s grace
        out, err = result_lines(client, batch)
    assert batch.status == "cancelled"
    assert_each_once([line["custom_id"] for line in lines], out, err)
    assert len(err) >= 6 and {e["error"]["code"] for e in err} == {"batch_cancelled"}


def test_a_line_cancelled_or_expired_on_its_own_is_answered_as_its_route_answers(client, base_url, redis_url,
                                                                                  default_model_dir):
    """A line's job cancelled by DELETE /v1/jobs/{id}, or past its own `ttl`, while the batch goes on: its
    error line says what happened to it (409, 504, the job's error), not that the batch ended."""
    import httpx

    from batches.submit import line_job_id

    lines = chat_lines(3, MODEL)
    lines[0]["body"]["ttl"] = 1
    with ThreadedFakeWorker(redis_url, default_model_dir):
        pass  # the model's card stays in Redis; its lines queue until a worker comes
    with ThreadedFeeder(redis_url, fast_settings()):
        batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        jobs = [line_job_id(batch.id, i, MODEL) for i in range(3)]
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        deadline = time.time() + 10
        while not all(r.exists(keys.job_key(j)) for j in jobs) and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.delete(f"{base_url}/v1/jobs/{jobs[1]}").status_code == 200
        while r.hget(keys.job_key(jobs[0]), "state") != "expired" and time.time() < deadline:
            time.sleep(0.1)
        with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005):
            batch = wait_batch(client, batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    out, err = result_lines(client, batch)
    assert [o["custom_id"] for o in out] == ["req-2"]
    by_id = {e["custom_id"]: e for e in err}
    assert by_id["req-0"]["error"] is None and by_id["req-1"]["error"] is None
    expired, cancelled = by_id["req-0"]["response"], by_id["req-1"]["response"]
    assert (expired["status_code"], expired["request_id"]) == (504, jobs[0])
    assert expired["body"]["error"]["type"] == "deadline_exceeded"
    assert (cancelled["status_code"], cancelled["request_id"]) == (409, jobs[1])
    assert cancelled["body"]["error"]["type"] == "cancelled"
