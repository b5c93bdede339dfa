"""structlog set-up for the worker: readable lines on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO") -> None:
    """Call once at start-up (serve() does); library code only calls get_logger()."""
    if sys.stderr.isatty():
        render: list = [structlog.dev.ConsoleRenderer()]  # formats exceptions itself
    else:
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            *render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **bound: object) -> structlog.typing.FilteringBoundLogger:
    """A logger with `component` and any extra keys (job_id, worker) bound into every line."""
    return structlog.get_logger(component=name, **bound)
