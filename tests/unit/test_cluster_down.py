"""A Redis Cluster with a node down (or a slot moving) raises ClusterDownError or TryAgainError, which
redis-py makes ResponseErrors: the gateway answers them 503 as it answers Redis away, and each loop backs
off and retries instead of ending (a webhook deliverer that ended stayed down after the cluster healed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError

from gateway.errors import exception_response
from protocol.outage import Outage
from worker.intake import Intake
from worker.webhooks.relay import Relay

AWAY = [ClusterDownError("The cluster is down"), TryAgainError("TRYAGAIN Multiple keys request during rehashing")]


@pytest.mark.parametrize("error", AWAY)
def test_the_gateway_answers_503_redis_unavailable(error):
    response = exception_response(error)
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["code"] == "redis_unavailable"


def test_another_response_error_stays_a_500():
    assert exception_response(ResponseError("ERR something else")).status_code == 500


def failing_then_stopping(error: Exception, stop):
    calls = {"n": 0}

    async def once(*_: object) -> int:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise error
        stop()
        return 0
    return once, calls


@pytest.mark.parametrize("error", AWAY)
async def test_the_webhook_relay_rides_it_out(error):
    relay = Relay.__new__(Relay)
    stop = asyncio.Event()
    relay.run_once, calls = failing_then_stopping(error, stop.set)
    await asyncio.wait_for(relay.run(stop), 10)
    assert calls["n"] == 3


@pytest.mark.parametrize("error", AWAY)
async def test_intake_rides_it_out_as_an_outage(error, monkeypatch):
    intake = Intake.__new__(Intake)
    intake.stopped = False
    lost: list[Exception] = []

    def record(_: object, e: Exception) -> float:
        lost.append(e)
        return 0.0
    monkeypatch.setattr(Outage, "lost", record)
    poll, calls = failing_then_stopping(error, lambda: setattr(intake, "stopped", True))
    await asyncio.wait_for(intake._serve("intake", poll), 10)
    assert calls["n"] == 3 and lost == [error, error]
