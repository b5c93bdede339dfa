"""What GET /v1/jobs/{id} shows of a job's webhook: its URL, the state of its delivery and each attempt."""

from __future__ import annotations

import json

from gateway.responses import REFUSED_FOR_CLIENTS, job_object
from protocol import job_record as F

RECORD = {F.STATE: "succeeded", F.MODEL: "m", F.CREATED_AT: "1700000000"}


def test_a_job_without_a_webhook_shows_none():
    assert job_object("job_1", RECORD)["webhook"] is None


def test_a_webhook_is_pending_until_its_first_attempt_then_shows_each():
    url = "https://example.com/hook"
    assert job_object("job_1", {**RECORD, F.WEBHOOK_URL: url})["webhook"] == {
        "url": url, "state": "pending", "attempts": []}
    attempts = [{"outcome": "retry", "status": 503, "error": "HTTP 503", "next_retry_at": 1700000010.0,
                 "at": 1700000005.0},
                {"outcome": "delivered", "status": 200, "error": None, "next_retry_at": None, "at": 1700000010.5}]
    shown = job_object("job_1", {**RECORD, F.WEBHOOK_URL: url, F.WEBHOOK_ATTEMPTS: json.dumps(attempts)})
    assert shown["webhook"] == {"url": url, "state": "delivered", "attempts": attempts}
    assert job_object("job_1", {**RECORD, F.WEBHOOK_URL: url,
                                F.WEBHOOK_ATTEMPTS: json.dumps(attempts[:1])})["webhook"]["state"] == "retry"


def test_a_refused_attempt_does_not_tell_the_client_the_address_its_host_resolved_to():
    refused = {"outcome": "refused", "status": None, "next_retry_at": None, "at": 1700000005.0,
               "error": "webhook host intranet.example is a non-public address (10.1.2.3); an operator may allow it"}
    shown = job_object("job_1", {**RECORD, F.WEBHOOK_URL: "https://intranet.example/hook",
                                 F.WEBHOOK_ATTEMPTS: json.dumps([refused])})["webhook"]
    assert shown["state"] == "refused"
    assert shown["attempts"] == [{**refused, "error": REFUSED_FOR_CLIENTS}]
    assert "10.1.2.3" not in json.dumps(shown) and "TOKENQ_WEBHOOK_ALLOW" in REFUSED_FOR_CLIENTS
