"""A server that answers every streamed completion at once, with one chunk of text: what `bench serve`'s
client and HTTP cost on their own, to set against the time the queue path adds to a first token.

    python -m uvicorn tokenq.bench.null_server:app --loop uvloop --http httptools --port PORT
"""

from __future__ import annotations

import json

_CHUNK = ("data: " + json.dumps({"id": "cmpl-null", "object": "text_completion", "created": 0, "model": "null",
                                  "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]})
          + "\n\ndata: [DONE]\n\n").encode()


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": _CHUNK})
