"""The gateway's side of the response caches (respcache/): decide whether a request uses them, look it
up before it is queued, and on a hit write the job as already succeeded, so that every route (the
completion, its stream, GET /v1/jobs/{id}, the job's events, its webhook) answers it as any other final
job. On a miss the job is queued as usual, with a pending record that the worker turns into an entry
once the job succeeds (respcache.store.fill)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from gateway.flight import TtlCache
from gateway.sampling import default_max_tokens, requested_max_tokens
from gateway.schemas import ChatTemplateFields
from jobstore import IdempotencyKey, JobStore
from jobstore.connect import is_cluster
from protocol import job_record as F
from protocol import keys as protocol_keys
from protocol.jobs import JobPayload, JobResult, JobState, Usage
from protocol.tools import ToolCall, new_call_id
from respcache import keys as cache_keys
from respcache import policy, scope, store

if TYPE_CHECKING:
    from respcache.semantic import SemanticCache

POLICY_CACHE_S = 1.0
POLICY_STALE_S = 5.0
HEADER = "x-tokenq-cache"
ENTRY_HEADER = "x-tokenq-cache-entry"


@dataclass(frozen=True)
class Hit:
    kind: str  # "exact" or "semantic"
    result: JobResult
    entry_id: str  # the entry that answered, so that a client can remove a wrong answer


@dataclass(frozen=True)
class Lookup:
    hit: Hit | None
    pending: dict[str, Any]  # what the worker writes into the cache once the job succeeds


class ResponseCache:
    def __init__(self, redis: aioredis.Redis, lookups: Counter, hits: Counter,
                 index_entries: Gauge | None = None, index_loading: Gauge | None = None) -> None:
        """`index_entries` and `index_loading` read the semantic index at each scrape (0 until it exists)."""
        self.redis = redis
        # Its keys are not laid out for a Redis Cluster yet (one semantic log for every tenant): off there.
        self.available = not is_cluster(redis)
        self.lookups, self.hits = lookups, hits  # labels: kind (exact, semantic)
        self._semantic: SemanticCache | None = None
        self._policies = TtlCache()
        if index_entries is not None:
            index_entries.set_function(lambda: len(self._semantic) if self._semantic is not None else 0)
        if index_loading is not None:
            index_loading.set_function(lambda: float(self._semantic is not None and self._semantic.loading))

    @property
    def semantic(self) -> SemanticCache:
        """Created on first use: it imports numpy and, once started, loads the model (the `cache` extra);
        a gateway whose tenants use only the exact cache never does."""
        if self._semantic is None:
            from respcache.semantic import SemanticCache

            self._semantic = SemanticCache(self.redis)
        return self._semantic

    async def preload(self) -> bool:
        """Starts loading the semantic cache (its model, then its index) in the background once Redis holds
        semantic entries, so that the first semantic request after a start does not wait for the load;
        True once started. The gateway's warm-up calls it."""
        if self._semantic is not None:
            return True
        if not self.available or not await self.redis.exists(cache_keys.LOG_STREAM):
            return False
        self.semantic.start()
        return True

    async def policy(self, tenant: str) -> policy.TenantCachePolicy:
        async def read() -> policy.TenantCachePolicy:
            values = await self.redis.hmget(protocol_keys.tenant_key(tenant), list(policy.FIELDS))
            return policy.TenantCachePolicy.from_fields(values)

        return await self._policies.get(("cache", tenant), read, POLICY_CACHE_S, POLICY_STALE_S)

    async def decide(self, tenant: str, option: policy.CacheOption | None) -> policy.Decision | None:
        """The request's cache use before its prompt is rendered (determinism is checked on the payload)."""
        if not self.available or (option is not None and option.mode == "off"):
            return None
        return policy.decide(await self.policy(tenant), option, deterministic=True)

    async def lookup(self, decision: policy.Decision, payload: JobPayload, card_digest: str,
                     body: Any) -> Lookup | None:
        """None when the answer is not determined by the request (so nothing is cached)."""
        if not scope.deterministic(payload):
            return None
        tenant = payload.tenant
        exact_id = scope.exact_id(payload, card_digest)
        entry = await store.read_entry(self.redis, tenant, exact_id)
        if entry is not None:
            self._count("exact", hit=True)
            return Lookup(Hit("exact", _for(payload, entry.result), exact_id), {})
        self._count("exact", hit=False)
        pending: dict[str, Any] = {"tenant": tenant, "kind": payload.kind, "model": payload.model,
                                   "exact": exact_id, "semantic": None, "ttl": decision.ttl_s,
                                   "max": decision.max_entries}
        if decision.mode != "semantic":
            return Lookup(None, pending)
        asked, _ = requested_max_tokens(body)
        # Not the max_tokens the job got (the rest of the context, capped: the paraphrase's length moves it),
        # but the rule that set it, which differs by route (16 on /v1/completions, more elsewhere).
        max_tokens_rule = asked if asked is not None else f"default {default_max_tokens(body)}"
        template = body.template_options() if isinstance(body, ChatTemplateFields) else None
        key = scope.semantic_key(payload, card_digest, getattr(body, "messages", None),
                                 getattr(body, "prompt", None), max_tokens_rule, template)
        from respcache.index import encode_vector
        from respcache.semantic import LOAD_WAIT_S

        if key is None or not await self.semantic.ready(LOAD_WAIT_S):
            self._count("semantic", hit=False)
            return Lookup(None, pending)
        vector, match = await self.semantic.best(tenant, key.scope, key.text)
        if match is not None and match.probability >= decision.threshold:
            entry = await store.read_entry(self.redis, tenant, match.entry_id)
            if entry is not None and entry.scope == key.scope:
                self._count("semantic", hit=True)
                return Lookup(Hit("semantic", _for(payload, entry.result), match.entry_id), {})
            if entry is None:
                self.semantic.forget(tenant, match.entry_id)
        self._count("semantic", hit=False)
        if match is None or match.nearest_cosine < policy.NEAR_DUPLICATE_COSINE:
            pending["semantic"] = {"id": key.entry_id, "scope": key.scope, "text": key.text,
                                   "vec": encode_vector(vector)}
        return Lookup(None, pending)

    def _count(self, kind: str, hit: bool) -> None:
        self.lookups.labels(kind).inc()
        if hit:
            self.hits.labels(kind).inc()

    async def expect(self, job_id: str, lookup: Lookup) -> None:
        """Before the job is queued (a fast job could otherwise finish first)."""
        await store.write_pending(self.redis, job_id, lookup.pending)

    async def aclose(self) -> None:
        if self._semantic is not None:
            await self._semantic.aclose()


def _for(payload: JobPayload, result: JobResult) -> JobResult:
    """The cached answer as this request's: its own prompt, every prompt token counted as cached, and tool
    calls of ids of its own (a client matches a tool's result to its call by the id)."""
    prompt = len(payload.prompt_token_ids)
    usage = Usage(prompt_tokens=prompt, completion_tokens=result.usage.completion_tokens,
                  total_tokens=prompt + result.usage.completion_tokens, cached_tokens=prompt)
    update: dict[str, Any] = {"usage": usage, "tool_calls": _new_ids(result.tool_calls)}
    if result.choices:
        choices = [c.model_copy(update={"tool_calls": _new_ids(c.tool_calls)}) for c in result.choices]
        update.update(choices=choices, tool_calls=choices[0].tool_calls)
    return result.model_copy(update=update)


def _new_ids(calls: list[ToolCall] | None) -> list[ToolCall] | None:
    return [c.model_copy(update={"id": new_call_id()}) for c in calls] if calls else calls


async def write_hit(jobs: JobStore, payload: JobPayload, request_json: str, metadata: dict[str, str],
                    hit: Hit, idempotency: IdempotencyKey | None, rpm: int) -> tuple[str, dict[str, str]]:
    """The job of a hit, written already succeeded (never queued) and counted against the tenant's `rpm`;
    its webhook, if any, goes to the outbox as a finished job's does, and its Idempotency-Key is bound as a
    queued job's is. Returns the id of the job that holds the key (another one when a request with the same
    key came first) and the hash written; raises jobstore.Refused past the rpm."""
    now = repr(time.time())
    record = {
        F.STATE: JobState.succeeded.value, F.TENANT: payload.tenant, F.MODEL: payload.model,
        F.LANE: payload.lane, F.REQUEST: request_json, F.METADATA: json.dumps(metadata),
        F.PAYLOAD: payload.model_dump_json(), F.RESULT: hit.result.model_dump_json(), F.TEXT: hit.result.text,
        F.CREATED_AT: now, F.STARTED_AT: now, F.FINISHED_AT: now, F.SEQ: "0", F.ATTEMPTS: "0",
        F.STREAMED: "0", F.CACHE: hit.kind, F.CACHE_ENTRY: hit.entry_id,
    }
    if payload.webhook_url:
        record[F.WEBHOOK_URL] = payload.webhook_url
    holder = await jobs.write_finished(payload.id, payload.model, payload.tenant, record, idempotency,
                                       webhook=bool(payload.webhook_url), rpm=rpm)
    return holder, record
