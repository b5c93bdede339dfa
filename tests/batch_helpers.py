"""Helpers for Batch API tests: batch files, a feeder on a thread of its own, reading results back."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import Counter
from dataclasses import replace

import openai

from batches.service import FeederService
from batches.settings import BatchSettings

FINAL = ("completed", "failed", "expired", "cancelled")


def chat_lines(n: int, model: str, max_tokens: int = 4, words: int = 3, **body) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": _words(i, words)}], **body}}
            for i in range(n)]


def completion_lines(n: int, model: str, max_tokens: int = 4, words: int = 3, **body) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "max_tokens": max_tokens, "prompt": _words(i, words), **body}}
            for i in range(n)]


def _words(i: int, n: int) -> str:
    return " ".join(f"w{i}x{k}" for k in range(n))


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(client: openai.OpenAI, lines: list[dict] | bytes, name: str = "in.jsonl"):
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 120, until=FINAL):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def result_lines(client: openai.OpenAI, batch) -> tuple[list[dict], list[dict]]:
    out = client.files.content(batch.output_file_id).text.splitlines() if batch.output_file_id else []
    err = client.files.content(batch.error_file_id).text.splitlines() if batch.error_file_id else []
    return [json.loads(x) for x in out], [json.loads(x) for x in err]


def assert_each_once(custom_ids: list[str], out: list[dict], err: list[dict]) -> None:
    seen = Counter(line["custom_id"] for line in out + err)
    assert seen == Counter(custom_ids), {k: v for k, v in seen.items() if v != 1}


def fast_settings(**changes) -> BatchSettings:
    return replace(BatchSettings(), **{"poll_s": 0.05, "lease_s": 1.0, "cancel_grace_s": 2.0, **changes})


class ThreadedFeeder:
    """`tokenq batches` on an event loop of its own; `stop(abrupt=True)` cancels its tasks wherever they
    are, between any two Redis commands, as a crash would."""

    def __init__(self, redis_url: str, settings: BatchSettings | None = None, owner: str = "test-feeder") -> None:
        self.service = FeederService(redis_url, settings or fast_settings(), owner)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.task: asyncio.Task | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.task = asyncio.current_task()
            await self.service.run(self.stop_event)

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> ThreadedFeeder:
        self.thread.start()
        while self.stop_event is None:
            time.sleep(0.01)
        return self

    def stop(self, abrupt: bool = False) -> None:
        if abrupt:
            def kill() -> None:
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
            self.loop.call_soon_threadsafe(kill)
        else:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()
