"""One `tokenq up` per TOKENQ_HOME: it holds an exclusive lock on TOKENQ_HOME/up.lock for its lifetime
(the kernel drops the lock when the process dies, however it dies), and writes its pid and gateway URL
into the file so that a second one can say which instance is running, and so that clients of the gateway
(`tokenq batch`) find it by themselves."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO


class HomeLocked(RuntimeError):
    pass


class HomeLock:
    def __init__(self, home: Path) -> None:
        self.path = home / "up.lock"
        self._file: IO[str] | None = None

    def acquire(self, gateway_url: str) -> None:
        """Take the lock, or raise HomeLocked naming the instance that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            raise HomeLocked(
                f"tokenq up is already running on {self.path.parent} (pid {holder.get('pid', '?')}, gateway "
                f"{holder.get('gateway', '?')}); stop it first, or give this one another TOKENQ_HOME") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "gateway": gateway_url}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def running_gateway(home: Path) -> str | None:
    """The gateway URL of the `tokenq up` that holds `home`'s lock now; None when none does."""
    try:
        f = (home / "up.lock").open()
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: read what its holder wrote
            try:
                return json.loads(f.read() or "{}").get("gateway") or None
            except ValueError:
                return None
        return None  # nobody holds it (closing the file drops the lock just taken)
