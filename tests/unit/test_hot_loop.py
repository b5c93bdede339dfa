"""protocol/hot_loop.py: polls while busy, parks when not, and a poke wakes it."""

import asyncio

from protocol.hot_loop import HotLoop


async def test_polls_while_busy_and_parks_until_poked():
    due = {"n": 0}
    asked = {"n": 0}

    def busy() -> bool:
        asked["n"] += 1
        return due["n"] > 0

    hot = HotLoop(busy)
    task = asyncio.create_task(hot.run())
    await asyncio.sleep(0.01)
    parked_at = asked["n"]
    await asyncio.sleep(0.05)
    assert asked["n"] == parked_at  # idle: not one more look, the loop sleeps

    due["n"] = 1
    hot.poke()
    other = 0
    for _ in range(200):  # another task still runs between the polls
        await asyncio.sleep(0)
        other += 1
    assert other == 200 and asked["n"] > parked_at + 100  # busy: the loop never blocks

    due["n"] = 0
    await asyncio.sleep(0.01)
    parked_at = asked["n"]
    await asyncio.sleep(0.05)
    assert asked["n"] == parked_at  # parked again once nothing is due
    task.cancel()
