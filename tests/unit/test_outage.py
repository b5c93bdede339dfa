"""protocol/outage.once_reachable: what a role does when it starts while its Redis is away."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from protocol.outage import Outage, once_reachable
from tests.fakes import LogLines


def failing(times: int, error: Exception, result: object = "ok"):
    calls = {"n": 0}

    async def attempt() -> object:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return result
    return attempt, calls


async def test_retries_until_redis_answers_with_one_warning():
    log = LogLines()
    attempt, calls = failing(3, RedisConnectionError("refused"))
    assert await once_reachable(attempt, Outage(log, "start", base_s=0.001), asyncio.Event()) == "ok"
    assert calls["n"] == 4
    assert log.lines == [("warning", "redis unreachable; retrying with back-off"), ("info", "redis reachable again")]


async def test_stop_ends_the_wait():
    stop = asyncio.Event()
    attempt, calls = failing(10**9, RedisConnectionError("refused"))
    waiting = asyncio.create_task(once_reachable(attempt, Outage(LogLines(), "start", base_s=60), stop))
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is None
    assert calls["n"] == 1  # the back-off wait, not another attempt, was cut short


async def test_a_refused_password_is_not_an_outage():
    attempt, calls = failing(1, AuthenticationError("invalid password"))
    with pytest.raises(AuthenticationError):
        await once_reachable(attempt, Outage(LogLines(), "start", base_s=0.001), asyncio.Event())
    assert calls["n"] == 1


@pytest.mark.parametrize("error", [RedisConnectionError("Connection refused"),
                                   ResponseError("DB index is out of range")])
async def test_the_expiry_sweep_warns_once_while_redis_is_away(monkeypatch, error):
    """It warned every half second for as long as Redis was down, or was not a Redis it could use."""
    from jobstore import expiry

    lines = LogLines()
    monkeypatch.setattr(expiry, "log", lines)
    passes = {"n": 0}

    class Store:
        async def expire_due(self) -> int:
            passes["n"] += 1
            if passes["n"] <= 6:
                raise error
            return 0

    sweep = asyncio.create_task(expiry.sweep_forever(Store(), every_s=0.001))
    while passes["n"] < 8:
        await asyncio.sleep(0.01)
    sweep.cancel()
    assert lines.lines == [("warning", "redis unreachable; retrying with back-off"), ("info", "redis reachable again")]


def test_a_refused_password_mid_run_is_said_as_such_and_retried():
    """A running role whose Redis comes back with another password keeps retrying (a rotation may be under
    way), but its log names the password instead of calling Redis away, once per change of kind."""
    log = LogLines()
    outage = Outage(log, "intake", base_s=0.1, cap_s=0.4)
    delays = [outage.lost(RedisConnectionError("refused")), outage.lost(RedisConnectionError("refused")),
              outage.lost(AuthenticationError("invalid password")), outage.lost(AuthenticationError("invalid")),
              outage.lost(RedisConnectionError("refused"))]
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert [kind for kind, _ in log.lines] == ["warning", "error", "warning"]
    assert "refused the password" in log.lines[1][1]
    outage.restored()
    assert outage.lost(AuthenticationError("invalid password")) == 0.1
    assert log.lines[-2:] == [("info", "redis reachable again"), ("error", log.lines[1][1])]
