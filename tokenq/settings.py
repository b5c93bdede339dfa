"""Options shared by every role; each has an environment variable so containers need no flags."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def tokenq_home() -> Path:
    return Path(os.environ.get("TOKENQ_HOME", Path.home() / ".tokenq")).expanduser()


def embedded_redis_dir() -> Path:
    """Where `tokenq up`'s embedded Redis keeps its append-only file and its recorded address."""
    return tokenq_home() / "redis"


def embedded_redis_address_file() -> Path:
    return embedded_redis_dir() / "address"


def explicit_redis_url() -> str | None:
    """TOKENQ_REDIS_URL; None tells `tokenq up` to start its embedded Redis."""
    return os.environ.get("TOKENQ_REDIS_URL") or None


def redis_url() -> str | None:
    """TOKENQ_REDIS_URL, else the address `tokenq up` recorded for its embedded Redis under TOKENQ_HOME
    (so `tokenq keys` and a second worker find it by themselves), else None."""
    explicit = explicit_redis_url()
    if explicit:
        return explicit
    try:
        return embedded_redis_address_file().read_text().strip() or None
    except OSError:
        return None


def model_name() -> str:
    return os.environ.get("TOKENQ_MODEL", DEFAULT_MODEL)
