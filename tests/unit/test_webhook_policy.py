"""Webhook retry schedule, Retry-After parsing and which statuses are retried."""

from __future__ import annotations

import email.utils

import pytest

from worker.webhooks.policy import DEFAULT_DELAYS, RetryPolicy, parse_retry_after, retryable


def test_default_schedule_spans_more_than_a_day() -> None:
    policy = RetryPolicy()
    assert sum(DEFAULT_DELAYS) >= 24 * 3600
    assert list(DEFAULT_DELAYS) == sorted(DEFAULT_DELAYS)
    assert policy.delay_after(1) == 5
    assert policy.delay_after(policy.max_attempts - 1) == 24 * 3600
    assert policy.delay_after(policy.max_attempts) is None  # the last attempt is final


def test_retry_after_only_lengthens_and_is_capped() -> None:
    policy = RetryPolicy(delays=(5, 60))
    assert policy.delay_after(1, retry_after=2) == 5
    assert policy.delay_after(1, retry_after=30) == 30
    assert policy.delay_after(1, retry_after=10**9) == 60
    assert policy.delay_after(3, retry_after=30) is None


def test_schedule_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENQ_WEBHOOK_RETRY_DELAYS", "0.1, 0.5")
    assert RetryPolicy.from_env().delays == (0.1, 0.5)
    monkeypatch.delenv("TOKENQ_WEBHOOK_RETRY_DELAYS")
    assert RetryPolicy.from_env().delays == DEFAULT_DELAYS
    monkeypatch.setenv("TOKENQ_WEBHOOK_GONE_DISABLE_S", "60")
    assert RetryPolicy.from_env().gone_disable_s == 60


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now) == pytest.approx(90)
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None


@pytest.mark.parametrize(("status", "expected"), [(500, True), (503, True), (429, True), (404, False),
                                                  (400, False), (301, False), (410, False)])
def test_retryable(status: int, expected: bool) -> None:
    assert retryable(status) is expected
