"""`tokenq batch` checks that it can write its output file before it submits or fetches anything: not after
the whole batch has run. The gateway here is unreachable, so a command that got as far as HTTP says that
instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenq.cli import build_parser

GATEWAY = "http://127.0.0.1:1"


def tokenq_batch(*argv: str) -> str:
    args = build_parser().parse_args(["batch", "--url", GATEWAY, *argv])
    with pytest.raises(SystemExit) as e:
        args.func(args)
    return str(e.value.code)


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    return path


def test_submit_wait_into_a_missing_directory(requests_file):
    assert tokenq_batch("submit", str(requests_file), "--wait", "-o", "/nonexistent/dir/out.jsonl") == (
        "error: --output /nonexistent/dir/out.jsonl: there is no directory /nonexistent/dir")


def test_submit_wait_into_a_directory(requests_file, tmp_path):
    assert tokenq_batch("submit", str(requests_file), "--wait", "-o", str(tmp_path)) == (
        f"error: --output {tmp_path} is a directory: name a file in it")


def test_submit_without_wait_writes_nothing_and_checks_nothing(requests_file):
    assert "cannot reach the gateway" in tokenq_batch("submit", str(requests_file), "-o", "/nonexistent/x.jsonl")


@pytest.mark.parametrize("command", ["results", "wait"])
def test_results_and_wait_check_before_fetching(command, tmp_path):
    assert tokenq_batch(command, "batch_1", "-o", "/nonexistent/dir/out.jsonl") == (
        "error: --output /nonexistent/dir/out.jsonl: there is no directory /nonexistent/dir")
    assert tokenq_batch(command, "batch_1", "-o", str(tmp_path)) == (
        f"error: --output {tmp_path} is a directory: name a file in it")


def test_results_checks_its_errors_file(tmp_path):
    assert tokenq_batch("results", "batch_1", "-o", str(tmp_path / "out.jsonl"), "--errors", str(tmp_path)) == (
        f"error: --errors {tmp_path} is a directory: name a file in it")
