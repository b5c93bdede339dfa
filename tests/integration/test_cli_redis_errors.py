"""A Redis URL that names no Redis, or a Redis that refuses the command, is one line `error: ...` that names
the URL (its password hidden) and the cause, exit 1; never a traceback."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tokenq.cli import main
from tokenq.embedded_redis import free_port

COMMANDS = [["keys", "list"], ["status"], ["cache", "purge", "--tenant", "t"]]


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    """A server on a port that answers HTTP, not Redis."""
    server = http.server.HTTPServer(("127.0.0.1", free_port()), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def error_line(*argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert isinstance(e.value.code, str), "the exit status is 1, with the message"
    return e.value.code


@pytest.mark.parametrize("argv", COMMANDS)
@pytest.mark.parametrize("url, cause", [("notaurl", "is not a Redis URL"),
                                        ("http://127.0.0.1:6379", "is not a Redis URL"),
                                        ("redis://127.0.0.1:99999", "Port out of range")])
def test_not_a_redis_url(argv, url, cause):
    line = error_line(*argv, "--redis-url", url)
    assert line.startswith(f"error: --redis-url (or TOKENQ_REDIS_URL) {url!r} ") and cause in line


@pytest.mark.parametrize("argv", COMMANDS[:2])
def test_a_cluster_that_cannot_be_reached(argv):
    line = error_line(*argv, "--redis-url", "redis+cluster://127.0.0.1:1")
    assert line.startswith("error: Redis at redis+cluster://127.0.0.1:1 failed: RedisClusterException: Redis "
                           "Cluster cannot be connected")


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_server_that_is_not_redis(argv, http_url):
    line = error_line(*argv, "--redis-url", http_url)
    assert line.startswith(f"error: Redis at {http_url} failed: InvalidResponse: Protocol error")


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_db_index_out_of_range(argv, single_redis_url):
    url = single_redis_url.rsplit("/", 1)[0] + "/99"
    line = error_line(*argv, "--redis-url", url)
    assert line == f"error: Redis at {url} failed: ResponseError: DB index is out of range"


@pytest.mark.parametrize("argv", COMMANDS)
def test_the_password_is_not_printed(argv):
    port = free_port()
    line = error_line(*argv, "--redis-url", f"redis://:secret@127.0.0.1:{port}/0")
    assert line.startswith(f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (")
    assert "secret" not in line


@pytest.mark.parametrize("role, refusal", [
    ("batches", "error: batches need a single-node Redis"),
    ("webhooks", "error: arq does not support Redis Cluster: set TOKENQ_WEBHOOK_QUEUE_URL"),
])
def test_a_role_that_refuses_a_cluster_says_so(role, refusal):
    env = {k: v for k, v in os.environ.items() if k != "TOKENQ_WEBHOOK_QUEUE_URL"}
    done = subprocess.run([sys.executable, "-m", "tokenq", role, "--redis-url", "redis+cluster://127.0.0.1:1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith(refusal) and "Traceback" not in done.stderr


@pytest.mark.parametrize("role, password", [("gateway", ""), ("worker", ""), ("webhooks", ""), ("batches", ""),
                                            ("gateway", "default:wrong@")])
def test_a_role_refused_its_password_says_so_and_exits(guarded_redis, role, password):
    """Not a wait, a retry loop or a traceback: no wait cures a refused password (an old URL without the
    embedded Redis's password, say)."""
    url = f"redis://{password}127.0.0.1:{guarded_redis}/0"
    done = subprocess.run([sys.executable, "-m", "tokenq", role, "--redis-url", url], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: Redis at redis://") and "refused the password" in done.stderr
    assert "Traceback" not in done.stderr and "wrong" not in done.stderr
