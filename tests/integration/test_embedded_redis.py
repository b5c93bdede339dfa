"""`tokenq up`'s embedded Redis keeps one address per TOKENQ_HOME, recorded where the other commands
read it, and takes over from a redis-server of the same home left behind by a killed `tokenq up`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from tokenq import settings
from tokenq.embedded_redis import EmbeddedRedis, free_port, redis_server_binary, wait_for_port
from tokenq.home_lock import HomeLock, HomeLocked, running_gateway


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENQ_HOME", str(tmp_path))
    monkeypatch.delenv("TOKENQ_REDIS_URL", raising=False)
    monkeypatch.delenv("TOKENQ_URL", raising=False)
    return tmp_path


def test_same_address_at_every_start_and_found_by_settings(home):
    first = EmbeddedRedis(settings.embedded_redis_dir()).start()
    try:
        url = first.url
        redis.Redis.from_url(url).set("kept", "1")
        assert settings.redis_url() == url
    finally:
        first.stop()
    second = EmbeddedRedis(settings.embedded_redis_dir()).start()
    try:
        assert second.url == url
        assert redis.Redis.from_url(url).get("kept") == b"1"  # the same append-only file
    finally:
        second.stop()
    data_dir = settings.embedded_redis_dir()  # prompts, answers and webhook secrets: this user's alone
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert all((data_dir / name).stat().st_mode & 0o777 == 0o600 for name in ("address", "redis.conf"))


def test_the_port_needs_the_recorded_password(home):
    server = EmbeddedRedis(settings.embedded_redis_dir()).start()
    try:
        password = server.password
        assert password and len(password) >= 32 and f":{password}@" in server.url
        with pytest.raises(redis.AuthenticationError):  # another user of the host finds the port, not the data
            redis.Redis(port=server.port).get("any")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="guess").get("any")
        assert redis.Redis.from_url(server.url).ping()
        # Not on the command line, which `ps` shows every user.
        assert password.encode() not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
    finally:
        server.stop()


def test_a_home_recorded_without_a_password_gets_one(home):
    data_dir = settings.embedded_redis_dir()
    data_dir.mkdir(parents=True)
    (data_dir / "address").write_text(f"redis://127.0.0.1:{free_port()}/0\n")  # as an earlier tokenq wrote it
    server = EmbeddedRedis(data_dir).start()
    try:
        assert server.password and settings.redis_url() == server.url
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_an_orphan_of_the_same_home_is_stopped_and_replaced(home):
    orphan = EmbeddedRedis(settings.embedded_redis_dir()).start()
    url = orphan.url
    redis.Redis.from_url(url).set("kept", "1")
    fresh = EmbeddedRedis(settings.embedded_redis_dir()).start()  # the orphan still runs: as after kill -9
    try:
        assert fresh.url == url
        assert orphan.proc is not None and orphan.proc.wait(timeout=10) is not None
        assert redis.Redis.from_url(url).get("kept") == b"1"
    finally:
        fresh.stop()
        orphan.stop()


def test_explicit_url_wins(home, monkeypatch):
    monkeypatch.setenv("TOKENQ_REDIS_URL", "redis://elsewhere:1/0")
    assert settings.redis_url() == "redis://elsewhere:1/0"


def test_one_up_per_home(home, monkeypatch):
    lock = HomeLock(home)
    lock.acquire("http://127.0.0.1:1")
    try:
        # Another process (the lock is per open file, so another process is the honest check).
        probe = subprocess.run(
            ["python3", "-c", "import fcntl,sys; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
             str(home / "up.lock")], capture_output=True, text=True)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
        with pytest.raises(HomeLocked, match="already running.*http://127.0.0.1:1"):
            HomeLock(home).acquire("http://127.0.0.1:2")
        # Clients of the gateway find the running one (and an explicit TOKENQ_URL wins).
        assert running_gateway(home) == "http://127.0.0.1:1"
        assert settings.gateway_url() == "http://127.0.0.1:1"
        monkeypatch.setenv("TOKENQ_URL", "http://elsewhere:9")
        assert settings.gateway_url() == "http://elsewhere:9"
        monkeypatch.delenv("TOKENQ_URL")
    finally:
        lock.release()
    # The file stays, but nobody holds it: no gateway is running.
    assert running_gateway(home) is None and settings.gateway_url() == settings.DEFAULT_GATEWAY_URL
    HomeLock(home).acquire("http://127.0.0.1:3")


def test_a_recorded_port_held_by_another_password_protected_redis_is_left_at_once(home, tmp_path):
    """Not this home's orphan: a new port, without waiting for the other server to go."""
    port = free_port()
    other = subprocess.Popen([redis_server_binary(), "--port", str(port), "--requirepass", "not-ours", "--save", "",
                              "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        data_dir = settings.embedded_redis_dir()
        data_dir.mkdir(parents=True)
        (data_dir / "address").write_text(f"redis://default:mine@127.0.0.1:{port}/0\n")
        started = time.monotonic()
        server = EmbeddedRedis(data_dir).start()
        try:
            assert server.port != port and time.monotonic() - started < 5
            assert other.poll() is None  # left running
        finally:
            server.stop()
    finally:
        other.terminate()
        other.wait(timeout=10)


def test_a_command_given_the_wrong_password_says_so(home):
    from tokenq.redis_command import run_with_redis

    server = EmbeddedRedis(settings.embedded_redis_dir()).start()
    try:
        wrong = server.url.replace(server.password, "wrong")
        with pytest.raises(SystemExit, match="refused the password"):
            run_with_redis(wrong, lambda redis: redis.ping())
    finally:
        server.stop()
