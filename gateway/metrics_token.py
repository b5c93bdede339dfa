"""The bearer token the gateway's /metrics asks for: TOKENQ_METRICS_TOKEN, or the one kept in the file that
TOKENQ_METRICS_TOKEN_FILE names, made there by the first gateway that finds none. A deploy then closes
/metrics on a public port with no secret to choose: docker-compose.yml's gateways and Prometheus share the
file on a volume (Prometheus reads it as `credentials_file`)."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from tokenq.settings import SettingError


def load_or_create(path: Path, wait_s: float = 5.0) -> str:
    """The token in `path`; a new random one written there first when there is no such file. Gateways that
    start together agree: one creates it (O_EXCL), the others read what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while not (token := path.read_text().strip()):
            if time.monotonic() > deadline:
                raise SettingError(f"TOKENQ_METRICS_TOKEN_FILE {path} is empty: delete it and a gateway makes a "
                                   "new token") from None
            time.sleep(0.05)
        return token
    token = secrets.token_urlsafe(32)
    os.fchmod(fd, 0o644)  # whatever the umask: Prometheus, another user, reads it
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def metrics_token(token: str | None, token_file: str | None) -> str | None:
    """The token /metrics asks for (None: open), from the two settings; a token given outright wins."""
    if token:
        return token
    if not token_file:
        return None
    try:
        return load_or_create(Path(token_file))
    except OSError as e:  # a folder, an unreadable file, a parent that cannot be made
        raise SettingError(f"TOKENQ_METRICS_TOKEN_FILE {token_file}: {e.strerror or e}") from None
