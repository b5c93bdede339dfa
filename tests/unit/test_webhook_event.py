"""The webhook event body and its Standard Webhooks signature, checked with the reference verifier."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from protocol import job_record as F
from protocol.jobs import Choice, JobError, JobResult, Usage
from protocol.webhook_secret import new_secret
from worker.webhooks.event import event_body, message_id, signed_headers


def _record(**extra: str) -> dict[str, str]:
    return {F.STATE: "succeeded", F.MODEL: "m", F.METADATA: json.dumps({"k": "v"}),
            F.CREATED_AT: "1700000000.5", F.FINISHED_AT: "1700000003.25", F.TENANT: "t", **extra}


def test_succeeded_event() -> None:
    result = JobResult(text="hi", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=1,
                                                                    total_tokens=4), token_ids=[1])
    event = json.loads(event_body("job_1", _record(**{F.RESULT: result.model_dump_json()})))
    assert event["type"] == "job.succeeded"
    assert event["timestamp"] == "2023-11-14T22:13:23.250000Z"
    assert event["data"] == {
        "id": "job_1", "state": "succeeded", "model": "m", "metadata": {"k": "v"},
        "created_at": 1700000000, "finished_at": 1700000003,
        "result": {"text": "hi", "finish_reason": "stop", "stop_reason": None},
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cached_tokens": 0},
    }


def test_an_event_of_several_choices_carries_each() -> None:
    choices = [Choice(index=0, text="a", finish_reason="stop", stop_reason="\n", token_ids=[1]),
               Choice(index=1, text="b", finish_reason="length", token_ids=[2])]
    result = JobResult(text="a", finish_reason="stop", stop_reason="\n", choices=choices,
                       usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    event = json.loads(event_body("job_1", _record(**{F.RESULT: result.model_dump_json()})))
    assert event["data"]["result"] == {"text": "a", "finish_reason": "stop", "stop_reason": "\n", "choices": [
        {"index": 0, "text": "a", "finish_reason": "stop", "stop_reason": "\n"},
        {"index": 1, "text": "b", "finish_reason": "length", "stop_reason": None}]}


def test_failed_event_and_stable_body() -> None:
    rec = _record(**{F.STATE: "failed", F.ERROR: JobError(type="engine_error", message="boom").model_dump_json()})
    body = event_body("job_2", rec)
    assert body == event_body("job_2", rec)  # retries send the same bytes
    event = json.loads(body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == {"type": "engine_error", "message": "boom"}
    assert "result" not in event["data"]


def test_signature_verifies_and_binds_the_body() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    body = event_body("job_3", _record(**{F.STATE: "cancelled"}))
    headers = signed_headers(secret, message_id("job_3"), body)
    assert headers["webhook-id"] == "msg_job_3"
    assert Webhook(secret).verify(body, headers)["type"] == "job.cancelled"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("cancelled", "succeeded"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    old = signed_headers(secret, "msg_job_3", body, now=datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, old)
