"""A small fake worker that speaks docs/redis-protocol.md exactly, so the gateway is tested without torch.

Every write goes through jobstore, as the real worker's do. It "generates" by echoing the words of the decoded prompt, one word per step (or what `reply` says for
it; each of n choices its own); a prompt containing FAIL_ME ends in a failed job. Calls are parsed from the text as the real worker
parses them (JobResult.with_tool_calls)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from tokenizers import Tokenizer

from jobstore import DeltaWrite, FinalWrite, JobRef, JobStore
from jobstore.connect import connect
from protocol import choice_text, keys
from protocol import job_record as F
from protocol.events import DeltaEvent
from protocol.jobs import Choice, JobError, JobPayload, JobResult, Usage
from protocol.workers import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, ModelCard, WorkerHeartbeat

MODEL = "smollm2-135m-instruct"

def model_card(model_dir: Path, max_model_len: int) -> ModelCard:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return ModelCard(name=MODEL, max_model_len=max_model_len,
                     tokenizer_json=(model_dir / "tokenizer.json").read_text(),
                     chat_template=(model_dir / "chat_template.jinja").read_text(),
                     bos_token=config.get("bos_token"), eos_token=config.get("eos_token"))


class FakeWorker:
    def __init__(self, redis_url: str, model_dir: Path, step_s: float = 0.01, max_model_len: int = 2048,
                 capacity: int = 8, reply: Callable[[str], str] | None = None) -> None:
        self.redis_url = redis_url
        self.reply = reply  # given: the output for a decoded prompt, sent 5 characters a step
        self.card = model_card(Path(model_dir), max_model_len)
        self.tokenizer = Tokenizer.from_str(self.card.tokenizer_json)
        self.step_s = step_s
        self.capacity = capacity
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None
        self._grouped: set[str] = set()

    async def start(self) -> None:
        self.redis = connect(self.redis_url)
        self.store = JobStore(self.redis)
        await self.redis.hset(keys.model_card_key(MODEL), "card", self.card.model_dump_json())
        await self.redis.sadd(keys.MODELS_SET, MODEL)
        await self._heartbeat()
        self._main = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._main:
            self._main.cancel()
        for t in [self._main, *self._tasks]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in [self._main, *self._tasks] if t), return_exceptions=True)
        await self.redis.delete(keys.worker_key(self.worker_id))
        await self.redis.srem(keys.WORKERS_SET, self.worker_id)
        await self.redis.aclose()

    async def _heartbeat(self) -> None:
        beat = WorkerHeartbeat(worker_id=self.worker_id, model=MODEL, max_model_len=self.card.max_model_len,
                               capacity=self.capacity, running=len(self._tasks))
        await self.redis.set(keys.worker_key(self.worker_id), beat.model_dump_json(), ex=HEARTBEAT_TTL_S)
        await self.redis.sadd(keys.WORKERS_SET, self.worker_id)

    async def _run(self) -> None:
        last_beat = time.monotonic()
        while True:
            if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL_S:
                await self._heartbeat()
                last_beat = time.monotonic()
            took = False
            for lane in keys.LANES:  # highest first, never more than we can admit
                for stream in await self._lane_streams(lane):
                    room = self.capacity - len(self._tasks)
                    if room <= 0:
                        break
                    got = await self.redis.xreadgroup(keys.GROUP, self.worker_id, {stream: ">"}, count=room)
                    for stream_name, entries in got or []:
                        for entry_id, fields in entries:
                            took = True
                            task = asyncio.create_task(self._job(stream_name, entry_id, fields))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
            if not took:
                await asyncio.sleep(0.01)

    async def _lane_streams(self, lane: str) -> list[str]:
        """The lane's tenant streams (one per tenant, from the lane's tenant set), each with the group."""
        tenants = await self.redis.smembers(keys.lane_tenants_key(MODEL, lane))
        streams = [keys.jobs_stream(MODEL, lane, t) for t in sorted(tenants)]
        for stream in streams:
            if stream in self._grouped:
                continue
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._grouped.add(stream)
        return streams

    async def _job(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        payload = JobPayload.model_validate_json(fields["payload"])
        key = keys.job_key(payload.id)
        [started] = await self.store.start([payload.id], time.time(), self.worker_id)
        if started.code != 1:
            await self._ack(stream, entry_id)
            return
        seq = started.seq
        prompt = self.tokenizer.decode(payload.prompt_token_ids, skip_special_tokens=True)
        n = payload.sampling.n
        words = prompt.split()[: payload.sampling.max_tokens]
        echo = ([payload.echo_prompt] if payload.echo_prompt else []) + [w + " " for w in words]
        # Each choice asks `reply` on its own (a reply may differ per call), else echoes the prompt.
        outs = [self.reply(prompt) for _ in range(n)] if self.reply is not None else None
        pieces = ([[out[i:i + 5] for i in range(0, len(out), 5)] for out in outs] if outs is not None
                  else [echo] * n)
        texts, streamed, checked = [""] * n, False, 0.0
        published = [0] * n  # per choice: characters written as deltas
        for step in range(max(len(p) for p in pieces)):
            await asyncio.sleep(self.step_s)
            if time.monotonic() - checked > 0.2 or not streamed:  # re-read the flag now and then
                streamed = await self.redis.hget(key, F.STREAMED) == "1"
                checked = time.monotonic()
            for index, choice_pieces in enumerate(pieces):
                if step >= len(choice_pieces):
                    continue
                texts[index] += choice_pieces[step]
                if streamed:  # as the real worker: a job streamed late first gets all its text so far
                    seq += 1
                    offset, new = published[index], texts[index][published[index]:]
                    published[index] = len(texts[index])
                    event = DeltaEvent(seq=seq, offset=offset, index=index, text=new)
                    await self.store.write([DeltaWrite(payload.id, choice_text.stored(index, new, n), seq,
                                                       event.model_dump_json())], [])
        ref = JobRef.of(payload)
        if "FAIL_ME" in prompt or "REFUSE_ME" in prompt:  # the engine failed; the request was at fault
            error = JobError(type="engine_error" if "FAIL_ME" in prompt else "invalid_request_error",
                             message="the fake worker was asked to fail").model_dump_json()
            final = FinalWrite(ref, "failed", error_json=error, finished_at=time.time())
        else:
            finish = "length" if len(prompt.split()) > payload.sampling.max_tokens and not self.reply else "stop"
            choices = [Choice(index=i, text=t, finish_reason=finish) for i, t in enumerate(texts)]
            tokens = n * len(words) if outs is None else sum(len(p) for p in pieces)  # a piece a token
            usage = Usage(prompt_tokens=len(payload.prompt_token_ids), completion_tokens=tokens,
                          total_tokens=len(payload.prompt_token_ids) + tokens)
            result = JobResult(text=texts[0], finish_reason=finish, usage=usage,
                               choices=choices if n > 1 else None).with_tool_calls(payload.tools)
            result = result.model_dump_json()
            final = FinalWrite(ref, "succeeded", result_json=result, finished_at=time.time())
        await self.store.write([], [final])
        await self._ack(stream, entry_id)

    async def _ack(self, stream: str, entry_id: str) -> None:
        await self.redis.xack(stream, keys.GROUP, entry_id)
        await self.redis.xdel(stream, entry_id)


class ThreadedFakeWorker:
    """The fake worker on an event loop of its own, for tests whose client is synchronous."""

    def __init__(self, *args, **kwargs) -> None:
        self.worker = FakeWorker(*args, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeWorker:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.worker.start(), self.loop).result(timeout=30)
        return self.worker

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.worker.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
