"""Job options (deadline, ttl, webhook_url) and request parsing, without Redis; hypothesis for parsing."""

from __future__ import annotations

import base64
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.admission import check_idempotency_key
from gateway.apikeys import key_digest, new_api_key
from gateway.auth import bearer_token
from gateway.errors import ApiError
from gateway.options import check_webhook, parse_deadline
from gateway.schemas import ChatCompletionRequest, JobCreate
from protocol.jobs import JobPayload
from protocol.sampling import SamplingParams
from protocol.webhook_secret import new_secret

NOW = 1_800_000_000.0


def test_ttl_and_deadline_forms():
    assert parse_deadline(None, None, NOW) is None
    assert parse_deadline(None, 30, NOW) == NOW + 30
    assert parse_deadline(NOW + 5, None, NOW) == NOW + 5
    assert parse_deadline("2030-01-01T00:00:00Z", None, NOW) == 1893456000.0
    assert parse_deadline("2030-01-01T01:00:00+01:00", None, NOW) == 1893456000.0
    assert parse_deadline("2030-01-01t00:00:00.25z", None, NOW) == 1893456000.25  # RFC 3339 5.6's variants
    assert parse_deadline("2030-01-01 00:00:00-00:00", None, NOW) == 1893456000.0


@pytest.mark.parametrize(("deadline", "ttl", "param", "words"), [
    (NOW - 1, None, "deadline", "past"),
    (NOW, None, "deadline", "past"),
    ("2020-01-01T00:00:00Z", None, "deadline", "past"),
    ("2030-01-01T00:00:00", None, "deadline", "zone"),  # no offset: not RFC 3339
    ("2030-01-01", None, "deadline", "RFC 3339"),
    ("20300101T000000Z", None, "deadline", "YYYY-MM-DDTHH:MM:SS"),  # ISO 8601, not RFC 3339
    ("2030-W01-1T00:00:00Z", None, "deadline", "YYYY-MM-DDTHH:MM:SS"),
    ("2030-02-30T00:00:00Z", None, "deadline", "RFC 3339"),
    ("2030-01-01T00:00:00+24:00", None, "deadline", "RFC 3339"),
    ("9999-12-31T23:59:59Z", None, "deadline", "at most 3650 days"),  # the same limit as a number's
    ("soon", None, "deadline", "RFC 3339"),
    (math.inf, None, "deadline", "epoch"),
    (None, 0, "ttl", "positive"),
    (None, -3, "ttl", "positive"),
    (None, math.nan, "ttl", "positive"),
    (None, 4000 * 86400, "ttl", "at most"),
    ((NOW + 100) * 1000, None, "deadline", "epoch seconds"),  # milliseconds, as JavaScript's Date.now()
    (NOW + 9, 9, "deadline", "at most one"),
])
def test_bad_deadlines_name_the_field(deadline, ttl, param, words):
    with pytest.raises(ApiError) as e:
        parse_deadline(deadline, ttl, NOW)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_webhook_urls(monkeypatch):
    monkeypatch.delenv("TOKENQ_WEBHOOK_ALLOW", raising=False)
    assert check_webhook(None) is None
    assert check_webhook("https://hooks.example.com/x") == "https://hooks.example.com/x"
    for bad in ("http://127.0.0.1/x", "http://10.0.0.8/x", "http://[::1]/x", "ftp://example.com/x",
                "http://user:pw@example.com/x", "not a url"):
        with pytest.raises(ApiError) as e:
            check_webhook(bad)
        assert e.value.status == 400 and e.value.param == "webhook_url"
        assert e.value.message.startswith("webhook_url: ")
    monkeypatch.setenv("TOKENQ_WEBHOOK_ALLOW", "127.0.0.0/8")
    assert check_webhook("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080/x"


def test_keys_and_secrets():
    key = new_api_key()
    assert key.startswith("tq_") and len(key) > 40 and key != new_api_key()
    assert key_digest(key) == key_digest(key) and len(key_digest(key)) == 64
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert bearer_token("Bearer tq_abc") == "tq_abc"
    assert bearer_token("bearer  tq_abc ") == "tq_abc"
    assert bearer_token("Basic dXNlcjpwdw==") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_idempotency_key_shape():
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("order-1") == "order-1"
    for bad in ("", "x" * 256, "a\nb", "é", "ключ", "Ã©"):  # "Ã©": é's UTF-8 bytes read as latin-1
        with pytest.raises(ApiError) as e:
            check_idempotency_key(bad)
        assert e.value.param == "Idempotency-Key" and "printable ASCII" in e.value.message


def test_job_options_on_every_route():
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "ttl": 5, "run_to_completion": True})
    assert chat.ttl == 5 and chat.run_to_completion
    for ttl in ("5", True):  # JSON numbers only, as `deadline`: a string is not read as seconds
        with pytest.raises(ValidationError) as e:
            JobCreate.model_validate({"model": "m", "prompt": "x", "ttl": ttl})
        assert e.value.errors()[0]["loc"] == ("ttl",)
    job = JobCreate.model_validate({"model": "m", "prompt": "x", "deadline": "2030-01-01T00:00:00Z",
                                    "webhook_url": "https://e.example/h"})
    assert job.deadline == "2030-01-01T00:00:00Z" and job.webhook_url == "https://e.example/h"
    with pytest.raises(ValidationError):
        JobCreate.model_validate({"model": "m", "prompt": "x", "webhook_url": "h" * 3000})


# --- property tests -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
job_fields = st.fixed_dictionaries({}, optional={
    "model": st.text(max_size=10) | st.integers(), "prompt": json_values, "messages": json_values,
    "deadline": json_values, "ttl": json_values, "webhook_url": json_values, "metadata": json_values,
    "priority": st.sampled_from(["interactive", "default", "batch", "urgent"]) | json_values,
    "max_tokens": json_values, "run_to_completion": json_values, "stream": json_values,
})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(job_fields)
def test_job_create_parses_or_refuses_cleanly(body):
    """Any JSON body: a JobCreate or a ValidationError, and the options then give a deadline or a 400."""
    try:
        job = JobCreate.model_validate(body)
    except ValidationError:
        return
    assert (job.messages is None) != (job.prompt is None)
    try:
        deadline = parse_deadline(job.deadline, job.ttl, NOW)
    except ApiError as e:
        assert e.status == 400 and e.param in ("deadline", "ttl")
    else:
        assert deadline is None or (math.isfinite(deadline) and deadline > NOW)


payloads = st.builds(
    JobPayload,
    id=st.text(min_size=1, max_size=40), model=st.text(min_size=1, max_size=20),
    kind=st.sampled_from(["chat", "completion"]), lane=st.sampled_from(["interactive", "default", "batch"]),
    prompt_token_ids=st.lists(st.integers(0, 200_000), max_size=50),
    sampling=st.builds(SamplingParams, max_tokens=st.integers(1, 4096),
                       temperature=st.floats(0, 2), seed=st.none() | st.integers(0, 2**63 - 1)),
    stream=st.booleans(), tenant=st.text(min_size=1, max_size=20),
    deadline=st.none() | st.floats(0, 4e9), webhook_url=st.none() | st.text(max_size=60),
    run_to_completion=st.booleans(),
)


@settings(max_examples=200)
@given(payloads)
def test_job_payload_round_trips(payload):
    """What the gateway writes is exactly what a worker reads back."""
    assert JobPayload.model_validate_json(payload.model_dump_json()) == payload
