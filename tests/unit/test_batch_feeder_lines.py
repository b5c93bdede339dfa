"""The batch feeder's lines: one held back is offered again every few seconds (batches/feeder.RETRY_CHECK_S)
and logs that it waits once, not at every offer; one whose job expired with the window is batch_expired."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

from batches import feeder as feeder_module
from batches.feeder import BatchFeeder
from batches.submit import RetryLater
from gateway.errors import ApiError
from tests.fakes import LogLines

LINE = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                   "body": {"model": "m", "prompt": "hi", "max_tokens": 2}})


def _feeder(monkeypatch, admitted: list[bool]) -> tuple[BatchFeeder, LogLines]:
    async def submit_line(*_args, **_kwargs) -> str:
        if admitted.pop(0):
            return "job"
        raise RetryLater(ApiError(429, "rate limit: try again in 77s", headers={"Retry-After": "77"}))

    async def tenant(_name: str) -> object:
        return object()

    async def record(_records) -> None:
        return None

    log = LogLines()
    monkeypatch.setattr(feeder_module, "submit_line", submit_line)
    monkeypatch.setattr(feeder_module, "log", log)
    feeder = BatchFeeder.__new__(BatchFeeder)
    feeder.ctx = SimpleNamespace(auth=SimpleNamespace(tenant=tenant))
    feeder.batch_id, feeder.retry_at, feeder.held_line = "batch_1", 0.0, None
    feeder._record = record
    return feeder, log


def test_a_line_held_back_logs_once_while_it_waits(monkeypatch):
    b = {"tenant": "acme", "expires_at": "9e9"}
    feeder, log = _feeder(monkeypatch, admitted=[False, False, False, True, False])
    for _ in range(3):  # three offers of line 2, each held back
        asyncio.run(feeder._submit(b, [(2, LINE)]))
    assert log.lines == [("info", "batch line not admitted yet"), ("debug", "batch line not admitted yet"),
                         ("debug", "batch line not admitted yet")]
    assert 0 < feeder.retry_at - time.time() <= feeder_module.RETRY_CHECK_S
    asyncio.run(feeder._submit(b, [(2, LINE), (3, LINE)]))  # line 2 admitted, then line 3 starts to wait
    assert log.lines[-1] == ("info", "batch line not admitted yet")


def test_a_line_whose_job_expired_with_the_window_is_batch_expired():
    """A line's job has the window's end for its deadline and may end `expired` before the feeder's loop
    records the batch's end; its line is then batch_expired, not a 504 response."""
    from batches.feeder import _job_outcome, batch_ending

    b = {"expires_at": "100.0"}
    kind, line = _job_outcome("a", "job_1", "expired", None, None, None, None, ending=batch_ending(b, 100.5))
    assert json.loads(line)["error"]["code"] == "batch_expired" and json.loads(line)["response"] is None
    assert batch_ending(b, 99.0) is None and batch_ending({**b, "ending": "cancelled"}, 101.0) == "cancelled"
    # A line's own shorter ttl, ended before the window: answered as the waiting route answers it.
    kind, line = _job_outcome("a", "job_1", "expired", None, None, None, None, ending=batch_ending(b, 50.0))
    assert json.loads(line)["error"] is None and json.loads(line)["response"]["status_code"] == 504
