"""One settings object reads every TOKENQ_* option of the roles, with defaults and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenq.settings import DEFAULT_MODEL, Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.model == DEFAULT_MODEL and s.redis_url is None and s.home == Path.home() / ".tokenq"
    assert (s.lease_s, s.max_deliveries, s.drain_grace_s, s.gateway_workers) == (30.0, 3, 10.0, 1)
    assert s.webhook_retry_delays is None


def test_values_from_environment():
    s = Settings.from_env({"TOKENQ_LEASE_S": "2.5", "TOKENQ_MAX_DELIVERIES": "7", "TOKENQ_REDIS_URL": "redis://x",
                           "TOKENQ_WEBHOOK_RETRY_DELAYS": "0.1, 0.2", "TOKENQ_MAX_QUEUE_DEPTH": "0"})
    assert (s.lease_s, s.max_deliveries, s.redis_url, s.max_queue_depth) == (2.5, 7, "redis://x", 0)
    assert s.webhook_retry_delays == (0.1, 0.2)


def test_a_bad_number_names_the_variable():
    with pytest.raises(ValueError, match="TOKENQ_LEASE_S"):
        Settings.from_env({"TOKENQ_LEASE_S": "soon"})


def test_roles_read_the_environment_when_they_start(monkeypatch):
    from worker.recovery import Recovery

    class _Redis:
        def register_script(self, _script):
            return None

    monkeypatch.setenv("TOKENQ_LEASE_S", "4")
    assert Recovery(_Redis(), "m", "c").lease_s == 4.0
