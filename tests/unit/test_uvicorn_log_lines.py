"""uvicorn's own lines (its start, stop and errors) are JSON lines beside the gateway's when stderr is no
terminal: a log shipper that parses one JSON object a line took them for garbage."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.logging import uvicorn_log_config


@contextmanager
def uvicorn_lines(monkeypatch) -> Iterator[io.StringIO]:
    """uvicorn's loggers set up by uvicorn_log_config, writing to the stderr yielded; put back after."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    kept = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level)
            for n in names}
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    try:
        logging.config.dictConfig(uvicorn_log_config())
        yield stderr
    finally:
        for n, (handlers, propagate, level) in kept.items():
            logger = logging.getLogger(n)
            logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


def test_uvicorn_lines_are_json_off_a_terminal(monkeypatch):
    with uvicorn_lines(monkeypatch) as stderr:
        logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:8000")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    started, failed = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert started["event"] == "Uvicorn running on http://127.0.0.1:8000" and started["level"] == "info"
    assert started["logger"] == "uvicorn.error" and "timestamp" in started
    assert failed["level"] == "error" and "RuntimeError: boom" in failed["exception"]


def test_a_terminal_keeps_uvicorns_readable_lines(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert uvicorn_log_config() is None


def test_uvicorn_lines_follow_the_level_and_name_the_gateway(monkeypatch):
    monkeypatch.setenv("TOKENQ_LOG_LEVEL", "WARNING")
    with uvicorn_lines(monkeypatch) as stderr:
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    [line] = (json.loads(text) for text in stderr.getvalue().splitlines())
    assert (line["event"], line["level"], line["role"]) == ("Invalid HTTP request received.", "warning", "gateway")
