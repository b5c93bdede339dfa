"""The log lines of every role, in one shape: one JSON object a line on stderr (a readable console on a
terminal), each with its `role` (gateway, worker, engine, webhooks, batches), at TOKENQ_LOG_LEVEL or above.
Under `tokenq up` the roles share one stderr, and `role` tells which process wrote a line."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Coroutine
from functools import partial
from typing import Any, Literal, TypeVar

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor

from tokenq.settings import Settings

Role = Literal["gateway", "worker", "engine", "webhooks", "batches"]
T = TypeVar("T")
_configured = False


def configure_logging(role: Role, *, at_least: str = "DEBUG") -> None:
    """Once, as a role's process starts (a later call changes nothing: loggers in use keep their set-up).
    Lines show from TOKENQ_LOG_LEVEL up, or from `at_least` where that is the more severe."""
    global _configured
    if _configured:
        return
    _configured = True
    level = max(logging.getLevelName(Settings.from_env().log_level), logging.getLevelName(at_least))
    structlog.configure(
        processors=[*line_processors(role), *renderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def line_processors(role: Role) -> list[Processor]:
    """What each line carries before it is rendered: the keys bound in its context (a request's job_id),
    its role, level and time (UTC)."""
    return [structlog.contextvars.merge_contextvars, partial(_add_role, role), structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.StackInfoRenderer()]


def _add_role(role: Role, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """A module's function, not a closure: uvicorn pickles the gateway's log config for each of its processes."""
    event_dict["role"] = role
    return event_dict


def on_terminal() -> bool:
    """Whether stderr is a person's terminal, where lines are for reading, not for a log shipper."""
    return sys.stderr.isatty()


def renderer() -> list[Processor]:
    if on_terminal():
        return [structlog.dev.ConsoleRenderer()]  # formats exceptions itself
    return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]


def get_logger(name: str, **bound: object) -> FilteringBoundLogger:
    """A logger with `component` and any extra keys (job_id, worker) bound into every line."""
    return structlog.get_logger(component=name, **bound)


def detached(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """A task that outlives the request that starts it (a shared connection's reader, a cache's loader):
    it runs in an empty context, so its lines carry none of that request's keys (its job_id)."""
    return asyncio.create_task(coro, name=name, context=contextvars.Context())
