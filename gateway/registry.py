"""What the workers serve, read from their heartbeats, and the model cards the gateway counts tokens with."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError

from gateway.errors import ApiError
from gateway.flight import SingleFlight
from gateway.prompts import PromptBuilder
from jobstore.connect import mget
from protocol import keys
from protocol.workers import ModelCard, WorkerHeartbeat

CARD_RECHECK_S = 30.0  # how long a cached card is trusted before Redis is asked again
LIVE_RECHECK_S = 1.0  # how long submissions trust a model's live workers before reading heartbeats again
LIVE_STALE_S = 10.0  # past LIVE_RECHECK_S, the last answer still serves while a background read renews it


def _served_by_none(digest: str, workers: list[WorkerHeartbeat]) -> bool:
    """Live workers that say which card they serve, none of them this one (a worker of a version before the
    heartbeat carried it says nothing)."""
    said = [w.card_digest for w in workers if w.card_digest is not None]
    return bool(said) and digest not in said


@dataclass
class _CachedCard:
    digest: str
    builder: PromptBuilder
    checked_at: float


@dataclass(frozen=True)
class ModelTarget:
    """A model a request may use: its card (through the prompt builder) and the live workers serving it
    (none while every worker of it is away: its jobs then wait in the queue)."""

    name: str
    prompts: PromptBuilder
    workers: list[WorkerHeartbeat]

    @property
    def max_model_len(self) -> int:
        return self.prompts.card.max_model_len


class Registry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._cards: dict[str, _CachedCard] = {}
        self._live: tuple[dict[str, list[WorkerHeartbeat]], float] | None = None
        self._flight = SingleFlight()

    async def live_workers(self) -> list[WorkerHeartbeat]:
        ids = sorted(await self.redis.smembers(keys.WORKERS_SET))
        if not ids:
            return []
        raws = await mget(self.redis, [keys.worker_key(i) for i in ids])
        workers = []
        for raw in raws:
            if raw is None:  # heartbeat expired: the worker is gone
                continue
            try:
                workers.append(WorkerHeartbeat.model_validate_json(raw))
            except ValidationError:
                continue
        return workers

    async def models(self) -> dict[str, list[WorkerHeartbeat]]:
        by_model: dict[str, list[WorkerHeartbeat]] = {}
        for w in await self.live_workers():
            by_model.setdefault(w.model, []).append(w)
        return by_model

    async def prompt_builder(self, model: str) -> PromptBuilder | None:
        """The model's prompt builder. A card changes only when a worker with other weights or another
        tokenizer comes up, so a card in hand keeps answering, past CARD_RECHECK_S while a background
        read rechecks it: at low load that recheck would otherwise land on some request's TTFT."""
        cached = self._cards.get(model)
        now = time.monotonic()
        if cached is None:
            return await self._flight.run(("card", model), lambda: self._load_card(model, None, now))
        if now - cached.checked_at >= CARD_RECHECK_S:
            self._flight.refresh(("card", model), lambda: self._load_card(model, cached, now))
        return cached.builder

    async def _load_card(self, model: str, cached: _CachedCard | None, now: float) -> PromptBuilder | None:
        key = keys.model_card_key(model)
        if cached is not None and await self.redis.hget(key, keys.MODEL_CARD_DIGEST_FIELD) == cached.digest:
            cached.checked_at = now  # unchanged: not worth reading (and hashing) megabytes again
            return cached.builder
        raw, digest = await self.redis.hmget(key, [keys.MODEL_CARD_FIELD, keys.MODEL_CARD_DIGEST_FIELD])
        if raw is None:
            self._cards.pop(model, None)
            return None
        if cached and cached.digest == digest:
            cached.checked_at = now
            return cached.builder
        # Building a tokenizer from a large card takes ~0.1 s: in a thread, not on the event loop.
        card = ModelCard.model_validate_json(raw)
        builder = await asyncio.to_thread(PromptBuilder, card)
        self._cards[model] = _CachedCard(digest or card.digest(), builder, now)
        return builder

    def card_digest(self, model: str) -> str | None:
        """The digest (ModelCard.digest) of the card `prompt_builder` last returned for `model` (the response
        cache keys on it)."""
        cached = self._cards.get(model)
        return cached.digest if cached is not None else None

    async def serving(self, model: str) -> list[WorkerHeartbeat]:
        """Live workers of `model` for a submission: a non-empty answer is reused for LIVE_RECHECK_S, then
        for LIVE_STALE_S more while a background read renews it (a job queued for a worker that died
        meanwhile just waits for the next one). Only a model missing from the answer waits for a read."""
        now = time.monotonic()
        if self._live is not None and model in self._live[0]:
            age = now - self._live[1]
            if age < LIVE_RECHECK_S:
                return self._live[0][model]
            if age < LIVE_RECHECK_S + LIVE_STALE_S:
                self._flight.refresh("models", self.models, lambda models: self.keep_live(models, now))
                return self._live[0][model]
        models = await self._flight.run("models", self.models)
        if models:
            self._live = (models, now)
        return models.get(model, [])

    def keep_live(self, models: dict[str, list[WorkerHeartbeat]], read_at: float) -> None:
        """`models`, read at `read_at`, answers `serving` from now on (none alive: `serving` reads)."""
        self._live = (models, read_at) if models else None

    async def target(self, model: str) -> ModelTarget:
        """The model for a request: one a worker has ever served (its card is kept) is accepted while no
        worker of it is live, and its jobs wait; 404 for a model nobody served, 503 while a known model's
        card is missing (a Redis that lost it: its next worker writes it again)."""
        workers = await self.serving(model)
        cached = self._cards.get(model)
        if cached is not None and _served_by_none(cached.digest, workers):
            # Its workers serve another card (other weights, a shorter context) from now on: the card this
            # gateway holds would count prompts against the old context and key the response cache on the
            # old weights until CARD_RECHECK_S runs out.
            await self._flight.run(("card", model), lambda: self._load_card(model, cached, time.monotonic()))
        builder = await self.prompt_builder(model)
        if builder is None:
            if not workers and not await self.redis.sismember(keys.MODELS_SET, model):
                raise ApiError(404, f"The model `{model}` does not exist.", param="model",
                               code="model_not_found")
            raise ApiError(503, f"model `{model}` has not published its model card yet; try again later",
                           code="no_model_card")
        return ModelTarget(model, builder, workers)
