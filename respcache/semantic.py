"""The semantic side of the response cache in one gateway process: embed the question, find the nearest
entries of its tenant and scope, let the verifier judge the best one. The embedder (onnxruntime, no torch) and
the index run on one worker thread, so the event loop never waits on them; both load on first use.

Every gateway keeps its index in step with Redis: at start it reads every semantic entry, then it tails
LOG_STREAM, on which each write and eviction is announced, so an entry written through one gateway is
found through another as soon as the tail reads it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
import structlog

from respcache import keys
from respcache.index import VectorIndex, decode_vector
from tokenq.logs import detached

log = structlog.get_logger(__name__)

CANDIDATES = 4  # nearest entries the verifier judges (respcache/train.py trains on as many)
LOAD_WAIT_S = 10.0  # how long a lookup waits for the model to load; past it, a miss
TAIL_BLOCK_MS = 1000
_LOAD_BATCH = 500  # entries read from Redis in one MGET while loading
# Entries added to the index in one call on the worker thread while loading: a lookup queued behind that
# call waits for it, so a start with many entries must not hold the thread for long at a time.
_ADD_CHUNK = 32


@dataclass(frozen=True)
class Match:
    entry_id: str
    probability: float
    text: str
    nearest_cosine: float = 0.0  # of the nearest entry, whichever the verifier liked best


class SemanticCache:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenq-semantic")
        self._index = VectorIndex()
        self._embedder = None
        self._verifier = None
        self._loading: asyncio.Task | None = None
        self._tail: asyncio.Task | None = None
        self._models = asyncio.Event()

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def start(self) -> asyncio.Task:
        """Load the model and the index, then tail the log (once; later calls return the same task). The first
        request that asks starts it, in a context of its own: its lines carry no request's job_id."""
        if self._loading is None:
            self._loading = detached(self._load())
            self._loading.add_done_callback(self._report, context=contextvars.Context())
        return self._loading

    def _report(self, task: asyncio.Task) -> None:
        """A failed load is logged once, whether or not a lookup was waiting for it; lookups then miss."""
        if not task.cancelled() and task.exception() is not None:
            log.error("semantic cache unavailable", error=repr(task.exception()))

    async def ready(self, timeout: float | None = None) -> bool:
        """Whether lookups can run: the model is loaded (entries may still be loading into the index, which
        answers from what it has so far). False past `timeout`, or when the load failed (the `cache` extra
        is missing, say): semantic lookups then miss, and the failure is logged once."""
        task = self.start()
        if not self._models.is_set():
            waiter = asyncio.ensure_future(self._models.wait())
            await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        return self._models.is_set()

    @property
    def loading(self) -> bool:
        """Whether the entries Redis held at start are still going into the index (lookups answer from what
        it has so far)."""
        return self._loading is not None and not self._loading.done()

    async def loaded(self) -> None:
        """Until every entry in Redis at start is in the index and the log is being tailed."""
        await asyncio.shield(self.start())

    async def _load(self) -> None:
        start = time.perf_counter()
        await self._call(self._load_models)
        self._models.set()
        newest = await self.redis.xrevrange(keys.LOG_STREAM, count=1)
        last = newest[0][0] if newest else "0-0"
        try:
            loaded = await self._load_entries()
        finally:
            self._tail = asyncio.create_task(self._follow(last))
        log.info("semantic cache loaded", entries=loaded, seconds=round(time.perf_counter() - start, 2))

    async def _load_entries(self) -> int:
        loaded = 0
        async for index_key in self.redis.scan_iter(match=keys.index_pattern(), count=1000):
            tenant = index_key[len(keys.ROOT) + 1:-len(":entries")]
            ids = [i for i in await self.redis.zrange(index_key, 0, -1) if i.startswith("s:")]
            for i in range(0, len(ids), _LOAD_BATCH):
                batch = ids[i:i + _LOAD_BATCH]
                raws = await self.redis.mget([keys.entry_key(tenant, e) for e in batch])
                expiries = await self._expiries(tenant, batch)
                rows = [(tenant, e, json.loads(r), ttl) for e, r, ttl in zip(batch, raws, expiries, strict=True) if r]
                for j in range(0, len(rows), _ADD_CHUNK):
                    await self._call(self._add_loaded, rows[j:j + _ADD_CHUNK])
                loaded += len(rows)
        return loaded

    async def _expiries(self, tenant: str, ids: list[str]) -> list[float]:
        scores = await self.redis.zmscore(keys.index_key(tenant), ids)
        return [s or 0.0 for s in scores]

    def _load_models(self) -> None:
        from threadpoolctl import threadpool_limits

        from respcache.embedder import Embedder
        from respcache.verifier import default_verifier

        # One BLAS thread for the features' small products (the embedder and the verifier keep to one thread each):
        # threads that spin waiting for each other on a busy machine cost more than they save.
        threadpool_limits(1)
        self._embedder = Embedder.load()
        self._verifier = default_verifier()

    def _add_loaded(self, rows: list[tuple[str, str, dict, float]]) -> None:
        for tenant, entry_id, data, expires_at in rows:
            if data.get("vec"):
                self._index.add(tenant, entry_id, data["scope"], decode_vector(data["vec"]), data["text"],
                                expires_at)

    def _apply(self, events: list[dict[str, str]]) -> None:
        for e in events:
            if e.get("op") == "add":
                self._index.add(e["tenant"], e["id"], e["scope"], decode_vector(e["vec"]), e["text"],
                                float(e["exp"]))
            elif e.get("op") == "del":
                self._index.remove(e["tenant"], e["id"])

    async def _follow(self, last: str) -> None:
        backoff = 0.1
        while True:
            try:
                reply = await self.redis.xread({keys.LOG_STREAM: last}, count=1000, block=TAIL_BLOCK_MS)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis away: keep trying, the index only lags
                log.warning("semantic cache log tail failed", error=repr(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _stream, entries in reply:
                if entries:
                    last = entries[-1][0]
                    await self._call(self._apply, [fields for _id, fields in entries])

    def embed_sync(self, texts: list[str]) -> np.ndarray:
        return self._embedder.embed(texts)

    async def embed(self, text: str) -> np.ndarray:
        return (await self._call(self.embed_sync, [text]))[0]

    def _best(self, tenant: str, scope: str, text: str, vector: np.ndarray | None) -> tuple[np.ndarray, Match | None]:
        if vector is None:
            vector = self._embedder.embed([text])[0]
        found = self._index.nearest(tenant, scope, vector, CANDIDATES, time.time())
        if not found:
            return vector, None
        probs = self._verifier.judge(vector, np.stack([c.vector for c in found]), text, [c.text for c in found])
        i = int(np.argmax(probs))
        return vector, Match(found[i].entry_id, float(probs[i]), found[i].text, float(found[0].vector @ vector))

    async def best(self, tenant: str, scope: str, text: str,
                   vector: np.ndarray | None = None) -> tuple[np.ndarray, Match | None]:
        """(the question's embedding, the nearest entry the verifier likes best or None)."""
        return await self._call(self._best, tenant, scope, text, vector)

    def forget(self, tenant: str, entry_id: str) -> None:
        """Drop an entry Redis no longer holds (found expired or evicted on a read)."""
        self._pool.submit(self._index.remove, tenant, entry_id)

    def __len__(self) -> int:
        return len(self._index)

    async def aclose(self) -> None:
        for task in (self._tail, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._pool.shutdown(wait=False, cancel_futures=True)
