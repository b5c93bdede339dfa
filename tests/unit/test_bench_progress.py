"""What a benchmark prints as it goes: its stages when it runs for minutes, and none of the product's info
lines between its own."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from tokenq.bench.fp8_accuracy import MODES, _stage
from tokenq.bench.launch import quiet_library_logs


def test_fp8_accuracy_names_each_stage_as_it_starts_and_its_seconds_as_it_ends(capsys: pytest.CaptureFixture[str]):
    with _stage(1, "perplexity, float32"):
        assert capsys.readouterr().out == f"[1/{2 * len(MODES)}] perplexity, float32 ..."  # before the work
    assert capsys.readouterr().out == " 0 s\n"


def test_a_benchmark_shows_the_products_warnings_but_not_its_info_lines():
    with capture_logs() as logs:
        structlog.get_logger("semantic").info("before")
        quiet_library_logs()  # tests/conftest.py puts the level back after the test
        structlog.get_logger("semantic").info("semantic cache loaded", entries=100)
        structlog.get_logger("semantic").warning("index out of step")
    assert [e["event"] for e in logs] == ["before", "index out of step"]
