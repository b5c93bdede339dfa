"""What a benchmark prints as it goes: its stages when it runs for minutes, and none of the product's info
lines between its own."""

from __future__ import annotations

import pytest
import structlog

from tokenq.bench.fp8_accuracy import MODES, _stage
from tokenq.bench.launch import quiet_library_logs


def test_fp8_accuracy_names_each_stage_as_it_starts_and_its_seconds_as_it_ends(capsys: pytest.CaptureFixture[str]):
    with _stage(1, "perplexity, float32"):
        assert capsys.readouterr().out == f"[1/{2 * len(MODES)}] perplexity, float32 ..."  # before the work
    assert capsys.readouterr().out == " 0 s\n"


def test_a_benchmark_shows_the_products_warnings_but_not_its_info_lines(capsys: pytest.CaptureFixture[str]):
    saved = structlog.get_config()  # another test's set-up comes back after this one
    structlog.reset_defaults()
    try:
        structlog.get_logger("semantic").info("semantic cache loaded", entries=100)
        assert "semantic cache loaded" in capsys.readouterr().out  # structlog's default shows it
        quiet_library_logs()
        structlog.get_logger("semantic").info("semantic cache loaded", entries=100)
        structlog.get_logger("semantic").warning("index out of step")
        out = capsys.readouterr().out
        assert "semantic cache loaded" not in out and "index out of step" in out
    finally:
        structlog.configure(**saved)
