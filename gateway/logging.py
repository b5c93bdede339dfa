"""What only the gateway adds to every role's log set-up (tokenq/logs.py): a request's job id in its lines,
and uvicorn's own lines in the same shape."""

from __future__ import annotations

from typing import Any

import structlog

from tokenq.logs import line_processors, on_terminal, renderer
from tokenq.settings import Settings


def uvicorn_log_config() -> dict[str, Any] | None:
    """uvicorn's own lines (its start, its stop, its errors) as the gateway's lines, at TOKENQ_LOG_LEVEL, when
    stderr is no terminal: a log shipper that parses one JSON object a line would take them for garbage.
    None on a terminal: uvicorn's readable defaults."""
    if on_terminal():
        return None
    level = Settings.from_env().log_level
    formatter = {"()": structlog.stdlib.ProcessorFormatter,
                 "foreign_pre_chain": [structlog.stdlib.add_logger_name, *line_processors("gateway")],
                 "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer()]}
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    quiet = {"handlers": ["json"], "level": level, "propagate": False}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"json": formatter},
            "handlers": {"json": handler}, "loggers": {"uvicorn": quiet, "uvicorn.error": {"level": level},
                                                       "uvicorn.access": quiet}}


def bind_job(job_id: str) -> None:
    """Every later log line of this request carries the job id."""
    structlog.contextvars.bind_contextvars(job_id=job_id)
