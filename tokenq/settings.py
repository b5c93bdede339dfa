"""Options shared by every role; each has an environment variable so containers need no flags."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def tokenq_home() -> Path:
    return Path(os.environ.get("TOKENQ_HOME", Path.home() / ".tokenq")).expanduser()


def redis_url() -> str | None:
    """None means: start an embedded Redis (only `tokenq up` does)."""
    return os.environ.get("TOKENQ_REDIS_URL") or None


def model_name() -> str:
    return os.environ.get("TOKENQ_MODEL", DEFAULT_MODEL)
