"""Assertions shared by the HTTP tests."""

from __future__ import annotations

import httpx


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """An OpenAI-shaped error with this status (and naming this parameter); returns its `error` object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err
