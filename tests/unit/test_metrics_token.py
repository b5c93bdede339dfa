"""The /metrics token a deploy need not choose: made once in a shared file, read by every gateway after."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.metrics_token import load_or_create, metrics_token
from tokenq.settings import SettingError


def test_the_first_gateway_makes_the_token_and_later_ones_read_it(tmp_path):
    path = tmp_path / "secrets" / "metrics-token"
    first = load_or_create(path)
    assert len(first) >= 32 and path.read_text() == first + "\n"
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o044  # Prometheus, another user, reads it
    assert load_or_create(path) == first
    assert load_or_create(tmp_path / "other") != first  # random, not derived


def test_gateways_starting_together_agree(tmp_path):
    path = tmp_path / "metrics-token"
    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: load_or_create(path), range(16)))
    assert tokens == {path.read_text().strip()}


def test_an_empty_file_is_an_error_that_says_what_to_do(tmp_path):
    path = tmp_path / "metrics-token"
    path.write_text("\n")
    with pytest.raises(SettingError, match=r"TOKENQ_METRICS_TOKEN_FILE .* is empty: delete it"):
        load_or_create(path, wait_s=0.1)


def test_a_path_that_cannot_hold_the_token_names_the_variable(tmp_path):
    """`tokenq gateway` then says one line, as for any bad TOKENQ_* variable, not a traceback."""
    (tmp_path / "a-file").write_text("x")
    for bad in (tmp_path, tmp_path / "a-file" / "token"):  # a folder; a file where its folder should be
        with pytest.raises(SettingError, match=f"TOKENQ_METRICS_TOKEN_FILE {bad}: "):
            metrics_token(None, str(bad))


def test_a_token_given_outright_wins_and_neither_leaves_metrics_open(tmp_path):
    path = tmp_path / "metrics-token"
    assert metrics_token("given", str(path)) == "given" and not path.exists()
    assert metrics_token(None, str(path)) == path.read_text().strip()
    assert metrics_token(None, None) is None
