"""Property-based API test: schemathesis generates requests from the gateway's own /openapi.json
(hypothesis bodies, headers and path parameters) and the gateway never answers with a 5xx: every bad
input is a 4xx in OpenAI's error JSON. A fake worker serves the model, so valid requests run to the end."""

from __future__ import annotations

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.app import create_app
from tests.integration.fake_worker import MODEL, ThreadedFakeWorker
from tests.processes import GatewayThread

# The schema needs no Redis: the app only connects in its lifespan.
schema = schemathesis.openapi.from_dict(create_app("redis://127.0.0.1:1/0").openapi())


@pytest.fixture(scope="module")
def base_url(redis_url, default_model_dir):
    redis.Redis.from_url(redis_url).flushdb()
    with GatewayThread(redis_url) as url, ThreadedFakeWorker(redis_url, default_model_dir, step_s=0.001):
        yield url


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    if isinstance(case.body, dict) and "model" in case.body and len(repr(case.body)) % 2:
        case.body["model"] = MODEL  # half the bodies name the served model, so they get past the lookup
    response = case.call(base_url=base_url, timeout=30)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
