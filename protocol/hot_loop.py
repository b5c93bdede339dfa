"""An event loop that polls instead of sleeping while an answer is on its way.

A process asleep in epoll runs again only once the kernel (and, on a virtual machine, the hypervisor) wakes
its idle core and schedules it; a lone request crosses eight such wake-ups. While `busy()` says a reply is
due (a job runs in the worker's engine; a client follows a job through the gateway), `run` yields to the
loop over and over, so the loop's poll never blocks and the reply is read the moment it lands. It costs a
core while busy, none while idle: `poke()` starts it, and it parks on an event once `busy()` turns false."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class HotLoop:
    def __init__(self, busy: Callable[[], bool]) -> None:
        self.busy = busy
        self._woken = asyncio.Event()

    def poke(self) -> None:
        """Something became due: poll until `busy()` turns false."""
        self._woken.set()

    async def run(self) -> None:
        while True:
            self._woken.clear()
            while self.busy():
                await asyncio.sleep(0)
            await self._woken.wait()
