"""The gateway under a real uvicorn server: SSE streams, resuming job events, and the official openai client."""

from __future__ import annotations

import json
import time
import zlib

import httpx
import openai
import pytest
import redis

from tests.integration.fake_worker import MODEL, ThreadedFakeWorker
from tests.processes import GatewayThread


@pytest.fixture
def base_url(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url:
        yield url


@pytest.fixture
def worker(base_url, redis_url, default_model_dir):
    with ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.03) as w:
        yield w


def sse_events(response: httpx.Response):
    """(id, event, data) of each event of an SSE response, as it arrives."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), fields["data"]
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_completion_stream_concatenates_to_final_text(base_url, worker):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "w1 w2 w3 w4 w5 w6",
                                                       "stream": True}) as r:
            assert r.status_code == 200
            datas = [d for _, _, d in sse_events(r)]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert len(chunks) >= 6  # it really streamed, one word per step
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    assert text == "w1 w2 w3 w4 w5 w6 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def words(n: int) -> str:
    return " ".join(f"t{i}" for i in range(n))


def test_job_events_resume_with_last_event_id(base_url, worker):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"model": MODEL, "prompt": words(40), "max_tokens": 100}).json()
        first: list[tuple[int, dict]] = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for event_id, event, data in sse_events(r):
                assert event == "delta"
                first.append((event_id, json.loads(data)))
                if len(first) == 5:
                    break
        last_id = first[-1][0]
        time.sleep(0.2)  # deltas published while nobody listens must come back from the snapshot
        second: list[tuple[int, dict]] = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_id}) as r:
            for event_id, event, data in sse_events(r):
                if event == "done":
                    final = json.loads(data)
                    break
                assert event == "delta"
                second.append((event_id, json.loads(data)))
    assert final["status"] == "succeeded"
    expected = final["result"]["choices"][0]["text"]
    assert expected == words(40) + " "
    at = ""
    for event_id, delta in first + second:  # contiguous: no text lost, none repeated
        assert delta["offset"] == len(at)
        at += delta["text"]
        assert event_id == f"{len(at)}.{zlib.crc32(at.encode()):08x}"  # the offset and the text's digest
    assert "".join(d["text"] for _, d in first + second) == expected


def test_job_events_asked_for_late_carry_the_text_from_its_start(base_url, worker):
    """The events of a job that has produced text before anyone streamed it: the worker sends what it has so
    far as its first delta, and the deltas join into the final text (the resume test above races with this
    when its GET comes after the worker's first step)."""
    with httpx.Client(base_url=base_url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"model": MODEL, "prompt": words(30), "max_tokens": 100}).json()
        time.sleep(0.3)  # several steps of 0.03 s, unstreamed
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            deltas, final = [], None
            for _, event, data in sse_events(r):
                if event == "done":
                    final = json.loads(data)
                    break
                deltas.append(json.loads(data))
    assert final is not None and final["status"] == "succeeded"
    assert deltas[0]["offset"] == 0 and deltas[0]["text"].startswith("t0 t1 ")
    assert "".join(d["text"] for d in deltas) == final["result"]["choices"][0]["text"] == words(30) + " "


def test_job_events_after_the_end(base_url, worker):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"model": MODEL, "prompt": "p q r s"}).json()
        for _ in range(300):
            if c.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded":
                break
            time.sleep(0.02)
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "2"}) as r:
            events = list(sse_events(r))
    end = f"8.{zlib.crc32(b'p q r s '):08x}"  # a bare offset resumes, and the ids carry the digest again
    assert [(i, e) for i, e, _ in events] == [(end, "delta"), (end, "done")]
    assert json.loads(events[0][2]) == {"text": "q r s ", "offset": 2, "index": 0}


def test_openai_client(base_url, worker):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "sun moon"}],
                                          max_tokens=50, temperature=0.0, seed=1)
    assert "sun moon" in chat.choices[0].message.content
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    pieces, usage = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "sun moon"}],
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    comp = client.completions.create(model=MODEL, prompt="a b c", max_tokens=2)
    assert comp.choices[0].text == "a b " and comp.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="a b c", stream=True) if ch.choices)
    assert streamed == "a b c "

    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert "temperature" in str(e.value)
