"""Test doubles: a deterministic engine with the LLMEngine interface, a gateway-side job submitter, a
worker's intake (publisher, engine loop) without the rest of the service, and a logger that records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol import job_record as f
from protocol import keys
from protocol.jobs import JobPayload
from protocol.sampling import SamplingParams
from worker.engine.outputs import RequestOutput, TokenLogprobs


class LogLines:
    """A structlog logger's stand-in (monkeypatched over a module's `log`, or handed to Outage): `lines` holds
    (level, event) of each call, whatever the process's log level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _line(self, level: str, event: str) -> None:
        self.lines.append((level, event))

    def debug(self, event: str, **_: object) -> None:
        self._line("debug", event)

    def info(self, event: str, **_: object) -> None:
        self._line("info", event)

    def warning(self, event: str, **_: object) -> None:
        self._line("warning", event)

    def error(self, event: str, **_: object) -> None:
        self._line("error", event)


@dataclass
class _Req:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    tenant: str
    order: int
    output: list[int] = field(default_factory=list)  # choice 0's
    others: dict[int, list[int]] = field(default_factory=dict)  # n > 1: the other running choices' outputs


class FakeEngine:
    """Echoes the prompt back, one token per step, as text "t{id} ", until the prompt ends ("stop") or
    max_tokens ("length"); choice i of a request with n > 1 echoes each id plus i. A token in
    stop_token_ids ends its choice ("stop", stop_reason the id). At most `capacity` requests at once, all
    running; `fail_at_step` makes that step raise once. An aborted request finishes with "abort" on the
    next step."""

    def __init__(self, capacity: int = 4, step_sleep: float = 0.002, max_model_len: int = 2048,
                 fail_at_step: int | None = None, cached_tokens: int = 0) -> None:
        self.capacity = capacity
        self.step_sleep = step_sleep
        self.max_model_len = max_model_len
        self.fail_at_step = fail_at_step
        self.cached_tokens = cached_tokens
        self.requests: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.added: list[tuple[str, int]] = []  # (request_id, priority) in add order
        self.peak = 0  # the most requests it held at once
        self.steps = 0
        self._order = 0

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    priority: int = 1, tenant: str = "default") -> None:
        if request_id in self.requests:
            raise ValueError(f"duplicate request {request_id}")
        self._order += 1
        self.requests[request_id] = _Req(request_id, list(prompt_token_ids), sampling, priority, tenant,
                                         self._order, others={i: [] for i in range(1, sampling.n)})
        self.added.append((request_id, priority))
        self.peak = max(self.peak, len(self.requests))

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.aborted)

    def num_admissible(self, priority: int = 2) -> int:
        """Free slots, whatever the priority (this engine never preempts)."""
        return max(0, self.capacity - len(self.requests))

    def stats(self) -> dict:
        return {"running": len(self.requests), "waiting": 0, "kv_usage": len(self.requests) / self.capacity,
                "prefix_hit_rate": 0.0}

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.fail_at_step is not None and self.steps == self.fail_at_step:
            raise RuntimeError("fake step failure")
        if self.step_sleep:
            time.sleep(self.step_sleep)
        outs = [RequestOutput(rid, [], "", finished=True, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        for req in sorted(self.requests.values(), key=lambda r: (r.priority, r.order)):
            for index, output in [(0, req.output), *req.others.items()]:
                if index == 0 and req.output is None:
                    continue
                out = self._next(req, index, output)
                if out.finished:
                    if index == 0:
                        req.output = None  # type: ignore[assignment]
                    else:
                        del req.others[index]
                    out.choices_left = len(req.others) + (req.output is not None)
                outs.append(out)
            if req.output is None and not req.others:
                del self.requests[req.request_id]
        return outs

    def _next(self, req: _Req, index: int, output: list[int]) -> RequestOutput:
        tok = req.prompt_token_ids[len(output)] + index
        output.append(tok)
        n = len(output)
        reason = stop_reason = None
        if tok in req.sampling.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif n >= req.sampling.max_tokens:
            reason = "length"
        elif n >= len(req.prompt_token_ids):
            reason = "stop"
        lps = None
        if req.sampling.logprobs is not None:
            lps = [TokenLogprobs(tok, -0.5, [(tok, -0.5), (tok + 1, -1.5)][: req.sampling.logprobs])]
        return RequestOutput(req.request_id, [tok], f"t{tok} ", finished=reason is not None, finish_reason=reason,
                             num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=n,
                             num_cached_tokens=self.cached_tokens, logprobs=lps, index=index,
                             stop_reason=stop_reason)


def expected_text(prompt_token_ids: list[int], max_tokens: int) -> str:
    return "".join(f"t{t} " for t in prompt_token_ids[:max_tokens])


async def submit_job(redis, payload: JobPayload, streamed: bool = False, request: str = "{}") -> str:
    """Write a job exactly as the gateway does (jobstore's submit, no limits). Returns the entry id."""
    from jobstore import JobStore

    await JobStore(redis).submit(payload, request, {}, streamed=streamed)
    return await redis.hget(keys.job_key(payload.id), f.ENTRY_ID)


@contextlib.asynccontextmanager
async def started_intake(redis, model: str, engine: FakeEngine | None = None, consumer: str = "host:1",
                         scripts=None, **intake_options) -> AsyncIterator:
    """(intake, publisher, engine) around a started engine loop, the tenant streams' groups made; the
    loop stops on the way out. Imported late: the worker modules need more than the fakes do."""
    from worker.engine_loop import EngineLoop
    from worker.intake import Intake
    from worker.publisher import Publisher

    engine = engine or FakeEngine()
    engine_loop = EngineLoop(engine)
    engine_loop.start()
    try:
        publisher = Publisher(redis, engine_loop, model, scripts=scripts)
        intake = Intake(redis, engine_loop, publisher, model, consumer, max_model_len=64,
                        **{"block_ms": 50, **intake_options})
        await intake.ensure_groups()
        try:
            yield intake, publisher, engine
        finally:
            await intake.aclose()
    finally:
        engine_loop.stop()



async def lane_streams(redis, model: str, lane: str) -> list[str]:
    """Every stream of one (model, lane): one per tenant that queued there."""
    tenants = await redis.smembers(keys.lane_tenants_key(model, lane))
    return [keys.jobs_stream(model, lane, t) for t in sorted(tenants)]
