"""A role warns before it starts when its Redis would evict keys once full (tokenq/redis_command.check_redis):
an evicted job record or stream entry is a job lost without an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis

from tokenq.redis_command import check_redis


@contextlib.contextmanager
def policy(client: redis.Redis, name: str) -> Iterator[None]:
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", name)
    try:
        yield
    finally:
        client.config_set("maxmemory-policy", before)


def test_an_evicting_single_redis_is_warned_of(single_redis_url, capsys):
    client = redis.Redis.from_url(single_redis_url)
    check_redis(single_redis_url, "gateway")
    assert capsys.readouterr().err == ""  # noeviction, the default
    for name in ("allkeys-lru", "volatile-ttl"):  # volatile: finished jobs' records have TTLs, and go first
        with policy(client, name):
            check_redis(single_redis_url, "worker")
        err = capsys.readouterr().err
        assert err.startswith(f"warning: tokenq worker: Redis at {single_redis_url}") and name in err
        assert "noeviction" in err and err.count("\n") == 1
    client.close()


def test_a_cluster_with_one_evicting_node_is_warned_of(redis_cluster_url, capsys):
    address = redis_cluster_url.replace("redis+cluster://", "redis://")
    check_redis(redis_cluster_url, "batches")
    assert capsys.readouterr().err == ""
    cluster = redis.cluster.RedisCluster.from_url(address)
    others = cluster.get_primaries()
    cluster.close()
    node = redis.Redis(host=others[-1].host, port=others[-1].port)  # not the node the URL names
    with policy(node, "allkeys-lfu"):
        check_redis(redis_cluster_url, "batches")
    assert "maxmemory-policy allkeys-lfu" in capsys.readouterr().err
    node.close()


def test_a_redis_that_is_away_is_left_to_the_role(capsys):
    check_redis("redis://127.0.0.1:1/0", "gateway")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("password", ["", "default:wrong@"])
def test_a_refused_password_still_stops_the_start(guarded_redis, password):
    with pytest.raises(SystemExit, match="refused the password"):
        check_redis(f"redis://{password}127.0.0.1:{guarded_redis}/0", "gateway")
