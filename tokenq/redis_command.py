"""What every `tokenq` command that works on Redis shares: the URL it needs (checked before anything starts,
and shown with its password hidden), one client for the command's run, and a clear error instead of a
traceback when Redis cannot be reached or does not answer as Redis."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable

from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobstore.connect import CLUSTER_SCHEMES, AnyRedis, connect
from jobstore.memory import evicts
from tokenq import settings

# A command's client waits this long for a connection and for each reply: a Redis that accepts connections and
# never answers (stopped with SIGSTOP, stuck behind a long script) must end a command with its error line, not
# hang it (or, under --watch, stall it).
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 10.0


def redacted(url: str) -> str:
    """The URL with its password (in the address, or as ?password=) shown as ***: the one form a command
    prints a Redis URL in."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    address, tail = rest[:end], rest[end:]
    userinfo, at, host = address.rpartition("@")
    if at and ":" in userinfo:
        address = f"{userinfo.partition(':')[0]}:***@{host}"
    tail = re.sub(r"([?&]password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{address}{tail}"


def require_redis_url(url: str | None) -> str:
    """`url` if it is one redis-py (or, for a cluster scheme, the cluster client) accepts; else the command
    stops here with one error line, before it starts anything that would fail with it again and again."""
    if not url:
        recorded = settings.embedded_redis_address_file()
        try:
            recorded.read_text()
        except FileNotFoundError:
            raise SystemExit("error: --redis-url (or TOKENQ_REDIS_URL) is required: no `tokenq up` has recorded an "
                             f"embedded Redis under TOKENQ_HOME ({settings.tokenq_home()})") from None
        except OSError as e:  # there is one, but not for this user: say so, not that there is none
            raise SystemExit(f"error: cannot read {recorded}, the address `tokenq up` recorded for its embedded "
                             f"Redis ({e.strerror}): run as the user that ran it, or pass --redis-url") from None
        raise SystemExit(f"error: --redis-url (or TOKENQ_REDIS_URL) is required: {recorded} is empty")
    scheme, _, rest = url.partition("://")
    try:
        parse_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}" if scheme in CLUSTER_SCHEMES else url)
    except ValueError as e:
        cluster = ", ".join(f"{s}://" for s in CLUSTER_SCHEMES)
        hint = f" (a Redis Cluster's: {cluster})" if "scheme" in str(e) else ""
        raise SystemExit(f"error: --redis-url (or TOKENQ_REDIS_URL) {redacted(url)!r} is not a Redis URL: "
                         f"{e}{hint}") from None
    return url


def _password_refused(url: str, error: AuthenticationError) -> SystemExit:
    return SystemExit(f"error: Redis at {redacted(url)} refused the password ({error}): put the right one in the "
                      "URL (`tokenq up`'s embedded Redis records its own in TOKENQ_HOME/redis/address)")


def check_redis(url: str, role: str) -> None:
    """What a role checks of its Redis before it starts. It exits with one line when a single-node Redis refuses
    the URL's password (or asks for one it lacks): a role rides out a Redis that is away, and would wait, retry
    or crash on a refusal that no wait cures. It warns on stderr when Redis would evict keys once full (a
    maxmemory-policy other than noeviction), as Sidekiq and BullMQ warn: an evicted job record, stream entry or
    webhook outbox entry is a job lost without an error, where noeviction refuses new work with a 503 instead
    (docs/tenants.md). A Redis that is away, or a cluster's password, is left to the role."""
    import redis as sync_redis
    from redis.cluster import RedisCluster

    scheme, _, rest = url.partition("://")
    options = {"socket_connect_timeout": 1, "socket_timeout": 2}
    try:
        if scheme in CLUSTER_SCHEMES:
            cluster = RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
            try:
                memory = list(cluster.info("memory", target_nodes=RedisCluster.PRIMARIES).values())
            finally:
                cluster.close()
        else:
            client = sync_redis.Redis.from_url(url, **options)
            try:
                memory = [client.info("memory")]
            except AuthenticationError as e:
                raise _password_refused(url, e) from None
            finally:
                client.close()
    except (RedisError, RedisClusterException, OSError):
        return
    policies = sorted({p for p in (str(m.get("maxmemory_policy", "")) for m in memory) if evicts(p)})
    if policies:
        print(f"warning: tokenq {role}: Redis at {redacted(url)} evicts keys when it is full (maxmemory-policy "
              f"{', '.join(policies)}): a job, its stream entry or its webhook can then vanish without an error; "
              "set maxmemory-policy noeviction (tokenq then answers 503 redis_oom until memory is freed)",
              file=sys.stderr)


def require_reachable(url: str) -> None:
    """Return once Redis at `url` answers a PING; else exit with run_with_redis's one line. For a command that
    would start roles on it, which wait for a Redis that is away without a word."""
    async def ping(redis: AnyRedis) -> int:
        await redis.ping()
        return 0

    run_with_redis(url, ping)


def run_with_redis(redis_url: str | None, command: Callable[[AnyRedis], Awaitable[int]]) -> int:
    """`command(redis)`'s exit code, on a client of `redis_url` closed afterwards."""
    url = require_redis_url(redis_url)

    async def run() -> int:
        redis = connect(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=REPLY_TIMEOUT_S)
        try:
            return await command(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except AuthenticationError as e:  # a ConnectionError to redis-py, but the server is up
        raise _password_refused(url, e) from None
    except RedisTimeoutError:
        raise SystemExit(f"error: Redis at {redacted(url)} did not answer within {REPLY_TIMEOUT_S:g} s (is it "
                         "stopped, or busy with a long command?)") from None
    except RedisConnectionError as e:
        raise SystemExit(f"error: cannot reach Redis at {redacted(url)} ({e}); is `tokenq up` running?") from None
    except (RedisError, RedisClusterException) as e:  # a server that is not Redis, a DB index out of range...
        raise SystemExit(f"error: Redis at {redacted(url)} failed: {type(e).__name__}: {e}") from None
