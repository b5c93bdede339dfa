"""`tokenq batches`: the feeders. Any number of these processes may run; each batch is fed by the one that
holds its lease, and a batch whose feeder died is taken over once its lease lapses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from redis.asyncio.client import PubSub

from batches import keys as K
from batches import metrics
from batches.feeder import BatchFeeder
from batches.settings import BatchSettings
from batches.submit import SubmitContext
from gateway.redis_client import make_redis
from jobstore.connect import is_cluster_url
from protocol.outage import REDIS_DOWN, Outage
from tokenq.logs import configure_logging, get_logger

log = get_logger("batches")


class FeederService:
    def __init__(self, redis_url: str, settings: BatchSettings | None = None, owner: str | None = None) -> None:
        self.redis_url = redis_url
        self.settings = settings or BatchSettings.from_env()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        if is_cluster_url(self.redis_url):
            raise ValueError("batches need a single-node Redis: their keys are not laid out for a Redis Cluster "
                             "yet (docs/redis-cluster.md)")
        redis = make_redis(self.redis_url)
        ctx = SubmitContext.build(redis)
        tasks: dict[str, asyncio.Task] = {}
        lease_ms = int(self.settings.lease_s * 1000)
        outage = Outage(log, "batch scan")
        pubsub = redis.pubsub()
        log.info("batch feeder started", owner=self.owner, window=self.settings.window)
        try:
            while not stop.is_set():
                if not pubsub.subscribed:
                    with contextlib.suppress(Exception):  # Redis away: the scan below says so
                        await pubsub.subscribe(K.NEW_BATCHES)
                try:
                    for batch_id in await redis.smembers(K.ACTIVE_BATCHES):
                        if batch_id in tasks:
                            continue
                        if await redis.set(K.lease_key(batch_id), self.owner, nx=True, px=lease_ms):
                            feeder = BatchFeeder(ctx, self.settings, self.owner, batch_id)
                            tasks[batch_id] = asyncio.create_task(feeder.run(stop))
                except REDIS_DOWN as e:  # the feeders wait too; look again after the back-off
                    await outage.wait_out(e, stop)
                    continue
                except Exception as e:  # such as a Redis out of memory: look again at the next poll
                    log.warning("could not scan the active batches", error=repr(e))
                else:
                    outage.restored()
                for batch_id, task in list(tasks.items()):
                    if task.done():
                        del tasks[batch_id]
                        if not task.cancelled() and task.exception() is not None:
                            log.error("batch feeder failed; the batch is taken up again",
                                      batch_id=batch_id, error=repr(task.exception()))
                metrics.FEEDING.set(len(tasks))
                await self._wait(pubsub, stop)
        finally:
            stop.set()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            metrics.FEEDING.set(0)
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            await redis.aclose()
            log.info("batch feeder stopped", owner=self.owner)


    async def _wait(self, pubsub: PubSub, stop: asyncio.Event) -> None:
        """Until a batch is created (its id on NEW_BATCHES), `stop`, or poll_s passes."""
        waits = [asyncio.ensure_future(stop.wait())]
        if pubsub.subscribed:
            waits.append(asyncio.ensure_future(
                pubsub.get_message(ignore_subscribe_messages=True, timeout=self.settings.poll_s)))
        try:
            done, _ = await asyncio.wait(waits, timeout=self.settings.poll_s, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                # Redis away: wait out the poll (the next scan logs it) rather than spin on the error.
                await asyncio.wait(waits[:1], timeout=self.settings.poll_s)
        finally:
            for t in waits:
                t.cancel()


def run_batches(redis_url: str, metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> int:
    """The `tokenq batches` process: runs until SIGTERM or SIGINT, then lets its feeders stop and exits 0."""
    from prometheus_client import start_http_server

    configure_logging("batches")
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await FeederService(redis_url).run(stop)

    asyncio.run(main())
    return 0
