"""A worker's heartbeat: what it serves and how loaded it is (the gateway lists models from these)."""

from __future__ import annotations

import hashlib
import time

from pydantic import BaseModel, Field

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 10  # a worker silent for this long is taken for dead


class WorkerHeartbeat(BaseModel):
    worker_id: str
    model: str
    max_model_len: int
    capacity: int  # sequences the engine can hold at once
    running: int = 0
    waiting: int = 0
    device: str = "cpu"
    kv_usage: float = 0.0  # share of KV-cache blocks in use
    tokens_per_s: float = 0.0  # output tokens per second, recent (worker/throughput.py)
    generation_tokens: float = 0.0  # output tokens since the worker started
    # ModelCard.digest of the card it serves: a gateway holding another card for the model reloads it at once
    card_digest: str | None = None
    at: float = Field(default_factory=time.time)


class ModelCard(BaseModel):
    """Written by a worker to `model_card_key(model)`: enough for the gateway to render and count prompts
    without model files of its own."""

    name: str
    max_model_len: int
    tokenizer_json: str  # the `tokenizers` JSON
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    # What else decides an answer: the weights (sampled) and the engine's numeric settings
    # (worker/models/card.engine_fingerprint). The response cache keys on the card's digest.
    engine: str = ""
    created: int = Field(default_factory=lambda: int(time.time()))

    def digest(self) -> str:
        """The sha256 of everything but `created` (when its worker started): a restarted worker of the same
        model keeps the digest, so the response cache's entries keep answering; other weights, tokenizer,
        template or numerics change it."""
        return hashlib.sha256(self.model_dump_json(exclude={"created"}).encode()).hexdigest()
