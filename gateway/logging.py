"""structlog set-up: a readable console when stderr is a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(level: int = logging.INFO) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    renderer = (structlog.dev.ConsoleRenderer() if sys.stderr.isatty()
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def uvicorn_log_config() -> dict[str, Any] | None:
    """uvicorn's own lines (its start, its stop, its errors) as JSON lines beside the gateway's when stderr is
    no terminal: a log shipper that parses one JSON object a line would take them for garbage. None on a
    terminal: uvicorn's readable defaults."""
    if sys.stderr.isatty():
        return None
    formatter = {"()": structlog.stdlib.ProcessorFormatter,
                 "foreign_pre_chain": [structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                                       structlog.processors.TimeStamper(fmt="iso")],
                 "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                                structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]}
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    quiet = {"handlers": ["json"], "level": "INFO", "propagate": False}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"json": formatter},
            "handlers": {"json": handler}, "loggers": {"uvicorn": quiet, "uvicorn.error": {"level": "INFO"},
                                                       "uvicorn.access": quiet}}


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def bind_job(job_id: str) -> None:
    """Every later log line of this request carries the job id."""
    structlog.contextvars.bind_contextvars(job_id=job_id)
