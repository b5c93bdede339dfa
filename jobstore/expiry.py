"""The expiry sweep: jobs past their deadline end `expired` within about a second, whether or not a worker
runs, so that their webhooks fire and their tenant's and lane's counters go down. Any number of gateways
may sweep at once: each expiry is one atomic script, and a job already final is left as it is."""

from __future__ import annotations

import asyncio

import structlog

from jobstore.store import JobStore
from protocol.outage import REDIS_DOWN, Outage

SWEEP_EVERY_S = 0.5

log = structlog.get_logger(__name__)


async def sweep_forever(store: JobStore, every_s: float = SWEEP_EVERY_S) -> None:
    """Expire due jobs every `every_s` until cancelled. A lost Redis is one warning and a back-off (protocol
    /outage.py), not a warning every pass; any other failure is logged and the next pass tries again."""
    outage = Outage(log, "expiry sweep", base_s=every_s)
    while True:
        try:
            while await store.expire_due() > 0:
                pass  # more than one pass's worth was due: go on at once
        except REDIS_DOWN as e:
            await asyncio.sleep(outage.lost(e))
            continue
        except Exception as e:  # noqa: BLE001 (a script error: the next pass tries again)
            log.warning("expiry sweep failed", error=repr(e))
        else:
            outage.restored()
        await asyncio.sleep(every_s)
