"""The webhook event for a finished job and its Standard Webhooks signature.

The body is built only from the job hash, so every retry sends the same bytes under the same
`webhook-id` (receivers dedupe on it); only `webhook-timestamp` and the signature are fresh each attempt,
since receivers reject timestamps more than a few minutes old."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from protocol import job_record as F
from protocol.jobs import Choice, JobError, JobResult


def message_id(job_id: str) -> str:
    return "msg_" + job_id


def _epoch(value: str | None) -> int | None:
    return int(float(value)) if value else None


def _iso(value: str | None) -> str:
    when = datetime.fromtimestamp(float(value), UTC) if value else datetime.now(UTC)
    return when.isoformat().replace("+00:00", "Z")


def _choice(c: Choice) -> dict[str, Any]:
    body = c.model_dump(include={"index", "text", "finish_reason", "stop_reason"})
    if c.tool_calls:
        body["content"] = c.content
        body["tool_calls"] = [call.model_dump() for call in c.tool_calls]
    return body


def event_body(job_id: str, record: dict[str, str]) -> str:
    """`{"type": "job.<state>", "timestamp", "data": {...}}` as compact JSON."""
    state = record.get(F.STATE, "")
    data: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "model": record.get(F.MODEL),
        "metadata": json.loads(record[F.METADATA]) if record.get(F.METADATA) else {},
        "created_at": _epoch(record.get(F.CREATED_AT)),
        "finished_at": _epoch(record.get(F.FINISHED_AT)),
    }
    if record.get(F.RESULT):
        result = JobResult.model_validate_json(record[F.RESULT])
        data["result"] = {"text": result.text, "finish_reason": result.finish_reason,
                          "stop_reason": result.stop_reason}
        if result.tool_calls:
            data["result"]["content"] = result.content
            data["result"]["tool_calls"] = [c.model_dump() for c in result.tool_calls]
        if result.choices:  # n > 1: every choice (the fields above are the first's)
            data["result"]["choices"] = [_choice(c) for c in result.choices]
        data["usage"] = result.usage.model_dump()
    if record.get(F.ERROR):
        data["error"] = JobError.model_validate_json(record[F.ERROR]).model_dump()
    event = {"type": f"job.{state}", "timestamp": _iso(record.get(F.FINISHED_AT)), "data": data}
    return json.dumps(event, separators=(",", ":"))


def signed_headers(secret: str, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }
