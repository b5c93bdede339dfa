"""The expiry sweep: jobs past their deadline end `expired` within about a second, whether or not a worker
runs, so that their webhooks fire and their tenant's and lane's counters go down. Any number of gateways
may sweep at once: each expiry is one atomic script, and a job already final is left as it is."""

from __future__ import annotations

import asyncio

import structlog

from jobstore.store import JobStore
from protocol.outage import Outage

SWEEP_EVERY_S = 0.5

log = structlog.get_logger(__name__)


async def sweep_forever(store: JobStore, every_s: float = SWEEP_EVERY_S) -> None:
    """Expire due jobs every `every_s` until cancelled. A failing Redis (gone, or not Redis at all: a wrong
    port, a database out of range) is one warning and a back-off (protocol/outage.py), not a warning every
    pass."""
    outage = Outage(log, "expiry sweep", base_s=every_s)
    while True:
        try:
            while await store.expire_due() > 0:
                pass  # more than one pass's worth was due: go on at once
        except Exception as e:  # noqa: BLE001 (the next pass tries again)
            await asyncio.sleep(outage.lost(e))
            continue
        outage.restored()
        await asyncio.sleep(every_s)
