"""`tokenq batch` against a real gateway (uvicorn on a thread), the fake worker and the feeder: submit with
--wait, wait, status, list, cancel and results, as a user types them; Ctrl-C while waiting leaves the batch
running and says how to follow it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from batches import cli
from tests.batch_helpers import ThreadedFeeder, assert_each_once, chat_lines, fast_settings, jsonl
from tests.integration.fake_worker import MODEL, ThreadedFakeWorker
from tests.processes import GatewayThread
from tokenq.cli import build_parser


@pytest.fixture
def url(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url:
        yield url


def tokenq_batch(url: str, *argv: str) -> int:
    args = build_parser().parse_args(["batch", "--url", url, *argv])
    return args.func(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_submit_wait_list_status_and_results(url, redis_url, default_model_dir, tmp_path, capsys):
    lines = chat_lines(6, MODEL)
    lines[2]["body"]["messages"][0]["content"] = "please FAIL_ME now"
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl(lines))
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=8), ThreadedFeeder(redis_url):
        assert tokenq_batch(url, "submit", str(requests), "--wait") == 0
    batch_id = capsys.readouterr().out.strip()
    out, err = tmp_path / "requests.output.jsonl", tmp_path / "requests.errors.jsonl"
    assert_each_once([line["custom_id"] for line in lines], read_jsonl(out), read_jsonl(err))
    assert [e["custom_id"] for e in read_jsonl(err)] == ["req-2"]

    assert tokenq_batch(url, "list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{batch_id}  completed")
    assert "5 completed, 1 failed of 6  /v1/chat/completions" in listed[0]
    assert tokenq_batch(url, "status", batch_id) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    again = tmp_path / "again.jsonl"
    assert tokenq_batch(url, "results", batch_id, "-o", str(again)) == 0
    assert again.read_bytes() == out.read_bytes()
    assert (tmp_path / "again.errors.jsonl").read_bytes() == err.read_bytes()


def test_ctrl_c_leaves_the_batch_running_then_wait_and_cancel(url, redis_url, default_model_dir, tmp_path,
                                                               capsys, monkeypatch):
    lines = chat_lines(30, MODEL, max_tokens=20, words=20)
    requests = tmp_path / "slow.jsonl"
    requests.write_bytes(jsonl(lines))
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.05, capacity=2), \
            ThreadedFeeder(redis_url, fast_settings(window=4, refill=1, cancel_grace_s=600)):
        follow = cli._follow

        def interrupted(client, batch, poll_s=1.0):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_follow", interrupted)
        assert tokenq_batch(url, "submit", str(requests), "--wait") == 130
        captured = capsys.readouterr()
        batch_id = captured.out.strip()
        assert f"follow it again with `tokenq batch wait {batch_id} -o {tmp_path / 'slow.output.jsonl'}`" in \
            captured.err
        assert not (tmp_path / "slow.output.jsonl").exists()

        monkeypatch.setattr(cli, "_follow", lambda client, batch: follow(client, batch, poll_s=0.05))
        assert tokenq_batch(url, "cancel", batch_id) == 0
        assert capsys.readouterr().out.startswith(f"{batch_id}  cancelling")
        out = tmp_path / "cancelled.jsonl"
        assert tokenq_batch(url, "wait", batch_id, "-o", str(out)) == 1  # it ended, but not completed
    errors = read_jsonl(tmp_path / "cancelled.errors.jsonl")
    done = read_jsonl(out) if out.exists() else []
    assert_each_once([line["custom_id"] for line in lines], done, errors)
    assert {e["error"]["code"] for e in errors if e["error"]} == {"batch_cancelled"}


def test_results_of_a_batch_that_runs_on_is_an_error(url, redis_url, tmp_path, capsys):
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(jsonl(chat_lines(2, MODEL)))
    assert tokenq_batch(url, "submit", str(requests)) == 0  # no feeder: the batch stays validating
    batch_id = capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as e:
        tokenq_batch(url, "results", batch_id, "-o", str(tmp_path / "out.jsonl"))
    assert f"batch {batch_id} is validating" in str(e.value) and f"tokenq batch wait {batch_id}" in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_failed_batch_says_why_and_leaves_no_earlier_output_behind(url, redis_url, default_model_dir, tmp_path,
                                                                      capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(chat_lines(2, MODEL)))
    mixed = chat_lines(2, MODEL)
    mixed[1]["url"] = "/v1/completions"
    mixed[1]["body"] = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(mixed))
    out = tmp_path / "res.jsonl"
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=8), ThreadedFeeder(redis_url):
        assert tokenq_batch(url, "submit", str(good), "--wait", "-o", str(out)) == 0
        assert len(read_jsonl(out)) == 2
        capsys.readouterr()
        assert tokenq_batch(url, "submit", str(bad), "--wait", "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "mismatched_endpoint: line 2: url '/v1/completions' differs" in err
    assert not out.exists() and "res.jsonl  (removed" in err


def test_a_download_that_fails_leaves_the_earlier_one(url, redis_url, default_model_dir, tmp_path, capsys):
    import httpx

    requests = tmp_path / "r.jsonl"
    requests.write_bytes(jsonl(chat_lines(2, MODEL)))
    out = tmp_path / "out.jsonl"
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.005, capacity=8), ThreadedFeeder(redis_url):
        assert tokenq_batch(url, "submit", str(requests), "--wait", "-o", str(out)) == 0
    batch_id = capsys.readouterr().out.strip()
    kept = out.read_bytes()
    assert len(read_jsonl(out)) == 2
    assert httpx.delete(f"{url}/v1/files/file-{batch_id.removeprefix('batch_')}-output").status_code == 200
    with pytest.raises(SystemExit) as e:
        tokenq_batch(url, "results", batch_id, "-o", str(out))
    assert "No such File object" in str(e.value)
    assert out.read_bytes() == kept and [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize(("content", "words"), [(b"{bad\n", "line 1: not valid JSON"), (b"", "has no requests")])
def test_a_bad_first_line_gets_the_gateways_reason(url, tmp_path, content, words):
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        tokenq_batch(url, "submit", str(requests))
    assert words in str(e.value), e.value
