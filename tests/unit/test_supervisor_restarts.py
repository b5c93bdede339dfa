"""tokenq up starts a role again after it exits, unless it exits as a bad flag does: no restart cures a setting
(a worker whose KV cache cannot hold one sequence would fail at every start, for ever)."""

from __future__ import annotations

import subprocess
import sys

from tokenq import supervisor
from tokenq.flag_checks import EXIT_SETTINGS
from tokenq.supervisor import Child


def _exiting(code: int):
    return lambda: subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])


def _watch_after_exit(child: Child) -> None:
    child.start()
    child.proc.wait(timeout=60)
    child.watch()


def test_a_role_that_crashed_is_scheduled_to_start_again():
    crashed = Child("worker", _exiting(1))
    _watch_after_exit(crashed)
    assert crashed.restart_at is not None and not crashed.refused_settings


def test_a_role_that_refused_its_settings_is_not_started_again_and_says_why(capsys, monkeypatch):
    refused = Child("worker", _exiting(EXIT_SETTINGS))
    _watch_after_exit(refused)
    refused.watch()
    assert refused.restart_at is None and refused.refused_settings
    assert capsys.readouterr().err.count("worker cannot run with these settings") == 1
    # The wait for the stack gives up at once instead of for its whole timeout.
    monkeypatch.setattr(supervisor, "serving", lambda url: False)
    assert supervisor._wait_ready("http://127.0.0.1:1/readyz", 600, lambda: False, [refused]) is False
