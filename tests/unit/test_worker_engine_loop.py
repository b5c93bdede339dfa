"""EngineLoop with the FakeEngine: outputs come back per step, aborts and errors are handled, idle waits."""

from __future__ import annotations

import asyncio
import threading
import time

from protocol.sampling import SamplingParams
from tests.fakes import FakeEngine
from worker import engine_loop as engine_loop_module
from worker.engine_loop import HANDOFF_MAX_OUTPUTS, EngineLoop, FailedOutput


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


async def test_first_tokens_and_ends_are_handed_over_at_light_load():
    """A batch with a first token or an end waits for the asyncio side to take it (the middle of a stream
    does not); with the asyncio loop blocked, the wait gives up after HANDOFF_WAIT_S and the engine goes on.
    Outputs carry the engine's clock."""
    engine = FakeEngine(step_sleep=0.005)
    loop = EngineLoop(engine)
    loop.start()
    try:
        before = time.time()
        loop.add("a", [1, 2, 3, 4], SamplingParams())  # 4 steps: first token, 2 middles, the end
        got = await collect(loop, {"a"})
        assert [o.urgent for o in got["a"]] == [True, False, False, True]
        assert loop.handoffs == 2
        assert all(before < o.produced_at <= time.time() for o in got["a"])
        loop.add("b", [1, 2, 3], SamplingParams())
        time.sleep(0.2)  # holds the asyncio loop: nobody takes b's first token nor its end
        assert loop.handoffs_late == 2 and not engine.requests  # the engine ran b to the end regardless
        await collect(loop, {"b"})
    finally:
        loop.stop()
    assert loop.handoffs == 4


async def test_handoff_lasts_until_the_consumer_has_written(monkeypatch):
    """With wait_for_written (the publisher's setting), taking an urgent batch is not enough: the engine
    thread goes on when written() is called, so the write has the interpreter to itself."""
    monkeypatch.setattr(engine_loop_module, "HANDOFF_WAIT_S", 5.0)  # no giving up within this test
    engine = FakeEngine(step_sleep=0.002)
    loop = EngineLoop(engine)
    loop.wait_for_written = True
    loop.start()
    try:
        loop.add("a", [1, 2, 3, 4], SamplingParams())
        first = await asyncio.wait_for(loop.outputs.get(), 5)
        assert [o.urgent for o in first] == [True]
        steps = loop.steps
        await asyncio.sleep(0.05)  # taken, not written: ~25 steps' time, and the engine stays put
        assert loop.steps == steps and loop.outputs.empty()
        loop.written()
        got = {"a": list(first)}
        while not got["a"][-1].finished:
            got["a"].extend(await asyncio.wait_for(loop.outputs.get(), 5))
            loop.written()
        assert len(got["a"]) == 4 and loop.handoffs == 2 and loop.handoffs_late == 0
    finally:
        loop.stop()


async def test_no_handoff_for_a_heavy_batch():
    engine = FakeEngine(capacity=HANDOFF_MAX_OUTPUTS + 1, step_sleep=0)
    loop = EngineLoop(engine)
    loop.start()
    try:
        for i in range(HANDOFF_MAX_OUTPUTS + 1):
            loop.add(f"r{i}", [1, 2, 3], SamplingParams())
        await asyncio.sleep(0)  # nothing ran yet on the engine thread, so all start in one step
        got = await collect(loop, {f"r{i}" for i in range(HANDOFF_MAX_OUTPUTS + 1)})
    finally:
        loop.stop()
    steps_with_all = sum(1 for _ in got["r0"])
    assert steps_with_all == 3 and loop.handoffs == 0


async def test_a_launch_watch_resolves_when_the_step_after_the_add_has_run():
    """Intake's wait for the prefill's launch: an idle loop says so, a watch taken before the add resolves
    once the engine's step returns (not before), and a watch with no step to come times out and is dropped."""
    engine = FakeEngine(step_sleep=0.03)
    loop = EngineLoop(engine)
    loop.start()
    try:
        await asyncio.sleep(0.02)
        assert loop.idle
        launch = loop.watch_launch()
        t0 = time.monotonic()
        loop.add("a", [1, 2, 3], SamplingParams())
        assert not loop.idle  # the add waits in the inbox
        assert await loop.wait_launch(launch, timeout=5)
        assert time.monotonic() - t0 >= 0.03 and engine.steps >= 1
        await collect(loop, {"a"})
        await asyncio.sleep(0.02)
        assert loop.idle
        late = loop.watch_launch()
        assert not await loop.wait_launch(late, timeout=0.05)
        assert not loop._launch_waiters
    finally:
        loop.stop()
