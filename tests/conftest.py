"""Shared fixtures. Integration tests get a real Redis server of their own on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tokenq.child_process import start_child
from tokenq.embedded_redis import free_port, redis_server_binary  # noqa: F401 - the tests import them from here


@pytest.fixture(autouse=True)
def _structlog_level_kept() -> Iterator[None]:
    """A test that runs a command (`tokenq bench` quiets the product's info lines for its whole process)
    leaves structlog's level as it found it, so a later test's capture_logs still sees info lines. Only the
    level: a logger cached on first use keeps the processors it was made with, which capture_logs edits."""
    import structlog

    wrapper_class = structlog.get_config()["wrapper_class"]
    yield
    structlog.configure(wrapper_class=wrapper_class)


@pytest.fixture(scope="session")
def redis_url(redis_kind: str, request: pytest.FixtureRequest) -> str:
    """One redis-server; in a module marked `both_redis`, the three-node cluster too (see redis_kind)."""
    return request.getfixturevalue("single_redis_url" if redis_kind == "single" else "redis_cluster_url")


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    """One redis-server for the whole session (tests flush it)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenq-redis-")
    proc = _start_redis([], port, workdir)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def guarded_redis() -> Iterator[int]:
    """The port of a redis-server that asks for the password `right`, as `tokenq up`'s embedded one asks for
    its own."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenq-redis-")
    proc = _start_redis(["--requirepass", "right"], port, workdir)
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_url: str):
    """A fresh client (a cluster client on the cluster) on flushed data."""
    async with _fresh_client(redis_url) as client:
        yield client


def _start_redis(args: list[str], port: int, workdir: str) -> subprocess.Popen:
    proc = start_child([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", workdir, *args],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # gone with a killed pytest too
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


CLUSTER_NODES = 3


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A three-node Redis Cluster (no replicas) of redis-server processes on free ports, made with
    `redis-cli --cluster create`; its URL names one node (jobstore/connect.py)."""
    cli = shutil.which("redis-cli")
    if cli is None or shutil.which("redis-server") is None:
        pytest.skip("the Redis Cluster tests need redis-server and redis-cli on PATH")
    root = tempfile.mkdtemp(prefix="tokenq-cluster-")
    ports = [free_port() for _ in range(CLUSTER_NODES)]
    procs = []
    try:
        for port in ports:
            workdir = os.path.join(root, str(port))
            os.mkdir(workdir)
            procs.append(_start_redis(["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                       "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"],
                                      port, workdir))
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.time() + 30
        while not all(_cluster_ok(cli, port) for port in ports):
            if time.time() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _cluster_ok(cli: str, port: int) -> bool:
    info = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10)
    return "cluster_state:ok" in info.stdout


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test of a module marked `both_redis` that takes Redis runs twice: on one redis-server and on
    the three-node cluster."""
    if metafunc.definition.get_closest_marker("both_redis") and "redis_kind" in metafunc.fixturenames:
        metafunc.parametrize("redis_kind", ["single", "cluster"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_kind(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "single")


@pytest.fixture(params=["single", "cluster"])
def store_redis_url(request: pytest.FixtureRequest) -> str:
    """The job store's own tests run twice: on one redis-server, and on the three-node cluster."""
    return request.getfixturevalue("single_redis_url" if request.param == "single" else "redis_cluster_url")


@pytest.fixture
async def store_client(store_redis_url: str):
    async with _fresh_client(store_redis_url) as client:
        yield client


@contextlib.asynccontextmanager
async def _fresh_client(url: str):
    from jobstore.connect import connect, is_cluster

    client = connect(url)
    if is_cluster(client):
        await client.flushdb(target_nodes=client.PRIMARIES)
    else:
        await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir():
    """The converted default model (pulled on first use, as `tokenq models pull` does)."""
    from tokenq.model_store import ensure_model
    from tokenq.settings import DEFAULT_MODEL

    return ensure_model(DEFAULT_MODEL)
