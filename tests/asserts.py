"""Assertions shared by the tests: OpenAI-shaped errors, and greedy runs that may part only at a near tie."""

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


def assert_agree_until_near_tie(name: str, want, got, margin: float = 0.1, logprob_tol: float = 0.1) -> None:
    """Two greedy runs of one request (engine outputs with `logprobs` >= 2) agree token for token, each chosen
    token with about the same logprob, up to a step where `want`'s two best tokens were within `margin` of
    each other. Another batch shape, a padded CUDA graph or FP8's requantization rounds sums differently, and
    a random model's logits are often near-tied; a wrong kernel, a stale buffer or a lost scale moves
    logprobs by far more than `logprob_tol` and diverges where one token clearly leads."""
    worst = 0.0
    for i, (w, g) in enumerate(zip(want.logprobs, got.logprobs, strict=True)):
        if w.token_id != g.token_id:
            gap = w.top[0][1] - w.top[1][1]
            print(f"{name}: the runs part at token {i}, where the first run's best led by {gap:.4f}")
            assert gap < margin, f"{name}: parted at token {i} where the first run's best led by {gap:.3f}"
            break
        worst = max(worst, abs(w.logprob - g.logprob))
        assert abs(w.logprob - g.logprob) < logprob_tol, (
            f"{name}: token {i} logprob {g.logprob:.4f} against {w.logprob:.4f}")
    print(f"{name}: chosen tokens' logprobs differ by {worst:.4f} at most while the runs agree")
