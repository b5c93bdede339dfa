"""The worker's and the engine's import of tokenq/logs.py, where every role's log set-up lives."""

from tokenq.logs import configure_logging, get_logger

__all__ = ["configure_logging", "get_logger"]
