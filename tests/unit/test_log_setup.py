"""Every role logs in one shape (tokenq/logs.py): its `role` in each line, at TOKENQ_LOG_LEVEL, whose bad
value is one error line before anything starts; uvicorn's lines follow the level too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenq.cli import main
from tokenq.flag_checks import EXIT_SETTINGS
from tokenq.settings import SettingError, Settings


@pytest.mark.parametrize("value, level", [(None, "INFO"), ("debug", "DEBUG"), ("Warning", "WARNING"),
                                          (" error ", "ERROR"), ("CRITICAL", "CRITICAL")])
def test_a_log_level_is_a_standard_name_in_any_case(value, level):
    assert Settings.from_env({} if value is None else {"TOKENQ_LOG_LEVEL": value}).log_level == level


@pytest.mark.parametrize("value", ["bogus", "10", "warn", "trace"])
def test_another_log_level_is_refused_naming_the_variable_and_the_levels(value):
    with pytest.raises(SettingError) as e:
        Settings.from_env({"TOKENQ_LOG_LEVEL": value})
    assert str(e.value) == (f"TOKENQ_LOG_LEVEL={value!r} is not a log level: it must be one of DEBUG, INFO, WARNING, "
                            "ERROR, CRITICAL (any case)")


def test_up_with_a_bad_log_level_says_so_in_one_line_and_starts_nothing(capsys, monkeypatch, tmp_path):
    def started(*args, **kwargs):
        raise AssertionError("`tokenq up` started although TOKENQ_LOG_LEVEL could not work")

    monkeypatch.setenv("TOKENQ_HOME", str(tmp_path))
    monkeypatch.setenv("TOKENQ_LOG_LEVEL", "bogus")
    monkeypatch.setattr("tokenq.model_store.resolve_model", started)
    monkeypatch.setattr("tokenq.supervisor.run_up", started)
    with pytest.raises(SystemExit) as e:
        main(["up"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_SETTINGS
    assert err.splitlines() == ["error: TOKENQ_LOG_LEVEL='bogus' is not a log level: it must be one of DEBUG, INFO, "
                                "WARNING, ERROR, CRITICAL (any case)"]


_PROBE = """
import sys
from tokenq.logs import configure_logging, get_logger
configure_logging(sys.argv[1], **({"at_least": sys.argv[2]} if len(sys.argv) > 2 else {}))
log = get_logger("probe")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
"""


def _lines(level: str | None, *args: str) -> list[dict]:
    """The JSON lines a process that configures logging with `args` writes at TOKENQ_LOG_LEVEL=`level`."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    if level is not None:
        env["TOKENQ_LOG_LEVEL"] = level
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stderr.splitlines()]


@pytest.mark.parametrize("role", ["gateway", "worker", "engine", "webhooks", "batches"])
def test_every_line_names_its_role_and_module(role):
    lines = _lines(None, role)
    assert [line["event"] for line in lines] == ["i", "w", "e"]
    assert all(line["role"] == role and line["component"] == "probe" and "timestamp" in line for line in lines)


@pytest.mark.parametrize("level, shown", [("DEBUG", "d i w e"), ("warning", "w e"), ("CRITICAL", "")])
def test_lines_show_from_the_settings_level_up(level, shown):
    assert [line["event"] for line in _lines(level, "gateway")] == shown.split()


@pytest.mark.parametrize("level, shown", [("DEBUG", "w e"), ("ERROR", "e")])
def test_a_floor_keeps_the_more_severe_of_it_and_the_setting(level, shown):
    """Tensor-parallel ranks log from WARNING up (rank 0 says the rest), and less where the setting says less."""
    assert [line["event"] for line in _lines(level, "engine", "WARNING")] == shown.split()


def test_the_gateway_server_runs_uvicorn_at_the_settings_level(monkeypatch):
    """uvicorn sets its loggers' levels from its own log_level after it applies the log config."""
    import gateway.server

    ran = {}
    monkeypatch.setenv("TOKENQ_LOG_LEVEL", "error")
    monkeypatch.setattr(gateway.server, "create_app", lambda url: "app")
    monkeypatch.setattr(gateway.server, "_exit_cleanly_after_shutdown", lambda: None)
    monkeypatch.setattr(gateway.server.uvicorn, "run", lambda app, **options: ran.update(options))
    gateway.server.run("127.0.0.1", 8000, "redis://127.0.0.1:1", workers=1)
    assert ran["log_level"] == "error"
