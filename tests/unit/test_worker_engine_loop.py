"""EngineLoop with the FakeEngine: outputs come back per step, aborts and errors are handled, idle waits."""

from __future__ import annotations

import asyncio
import threading

from protocol.sampling import SamplingParams
from tests.fakes import FakeEngine
from worker.engine_loop import EngineLoop, FailedOutput


async def collect(loop: EngineLoop, request_ids: set[str], timeout: float = 5.0) -> dict[str, list]:
    assert loop.outputs is not None
    got: dict[str, list] = {rid: [] for rid in request_ids}
    done: set[str] = set()
    while not request_ids <= done:
        batch = await asyncio.wait_for(loop.outputs.get(), timeout)
        for out in batch:
            got.setdefault(out.request_id, []).append(out)
            if out.finished:
                done.add(out.request_id)
    return got


async def test_outputs_arrive_one_batch_per_step():
    engine = FakeEngine(step_sleep=0)
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("a", [1, 2, 3], SamplingParams())
        loop.add("b", [4, 5], SamplingParams(max_tokens=1))
        got = await collect(loop, {"a", "b"})
    finally:
        loop.stop()
    assert "".join(o.text_delta for o in got["a"]) == "t1 t2 t3 "
    assert got["a"][-1].finish_reason == "stop"
    assert [o.finish_reason for o in got["b"]] == ["length"]
    assert threading.current_thread() is threading.main_thread()


async def test_num_admissible_counts_adds_not_yet_seen():
    engine = FakeEngine(capacity=3, step_sleep=0.05)
    loop = EngineLoop(engine)
    loop.start()
    try:
        assert loop.num_admissible() == 3
        loop.add("a", [1] * 50, SamplingParams())
        loop.add("b", [1] * 50, SamplingParams())
        assert loop.num_admissible() <= 1
        loop.add("c", [1] * 50, SamplingParams())
        assert loop.num_admissible() == 0
    finally:
        loop.stop()


async def test_idle_loop_does_not_step():
    engine = FakeEngine(step_sleep=0)
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("a", [1], SamplingParams())
        await collect(loop, {"a"})
        steps = engine.steps
        await asyncio.sleep(0.2)
        assert engine.steps == steps
        assert loop.alive
    finally:
        loop.stop()
    assert not loop.alive


async def test_step_error_fails_running_requests_and_loop_goes_on():
    engine = FakeEngine(step_sleep=0, fail_at_step=2)
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("a", [1] * 10, SamplingParams())
        got = await collect(loop, {"a"})
        last = got["a"][-1]
        assert isinstance(last, FailedOutput) and last.finish_reason == "error"
        assert "fake step failure" in last.error
        loop.add("b", [2, 3], SamplingParams())
        got = await collect(loop, {"b"})
        assert got["b"][-1].finish_reason == "stop"
    finally:
        loop.stop()
    assert loop.step_errors == 1


async def test_refused_add_fails_alone():
    engine = FakeEngine(step_sleep=0)
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("a", [1, 2], SamplingParams())
        loop.add("a", [1, 2], SamplingParams())  # duplicate: the fake engine raises
        got = await collect(loop, {"a"})
    finally:
        loop.stop()
    assert any(isinstance(o, FailedOutput) for o in got["a"])


async def test_a_refusal_that_is_the_requests_fault_says_so():
    """An exception with `error_type` (the engine's GrammarError) fails its request with that type; any
    other is the engine's."""

    class Refusing(FakeEngine):
        def add_request(self, request_id, prompt_token_ids, sampling, **kw):
            if request_id == "bad":
                raise type("GrammarLike", (ValueError,), {"error_type": "invalid_request_error"})("no compile")
            return super().add_request(request_id, prompt_token_ids, sampling, **kw)

    loop = EngineLoop(Refusing(step_sleep=0))
    loop.start()
    try:
        loop.add("bad", [1, 2], SamplingParams())
        got = await collect(loop, {"bad"})
    finally:
        loop.stop()
    failed = got["bad"][-1]
    assert isinstance(failed, FailedOutput) and failed.error_type == "invalid_request_error"
    assert "no compile" in failed.error


async def test_abort_removes_request():
    engine = FakeEngine(step_sleep=0.01)
    loop = EngineLoop(engine)
    loop.start()
    try:
        loop.add("a", [1] * 100, SamplingParams())
        await asyncio.sleep(0.05)
        loop.abort("a")
        got = await collect(loop, {"a"})
    finally:
        loop.stop()
    assert got["a"][-1].finish_reason == "abort"
    assert not engine.requests
