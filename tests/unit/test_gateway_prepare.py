"""A completion's token-id prompt: every id inside the vocabulary, else a 400 naming the first one that is not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.errors import ApiError
from gateway.prepare import _completion_prompt

PROMPTS = SimpleNamespace(vocab_size=100)


@pytest.mark.parametrize("prompt", [[0, 5, 99], [[7, 8]], []])
def test_ids_inside_the_vocabulary_pass_as_they_are(prompt):
    text, ids = _completion_prompt(prompt, PROMPTS)
    assert text is None and ids == (prompt[0] if prompt and isinstance(prompt[0], list) else prompt)


@pytest.mark.parametrize(("prompt", "bad"), [([1, 100, 2, -1], 100), ([3, -4, 200], -4), ([[5, 150]], 150)])
def test_the_first_id_outside_the_vocabulary_is_named(prompt, bad):
    with pytest.raises(ApiError) as e:
        _completion_prompt(prompt, PROMPTS)
    assert e.value.status == 400 and e.value.param == "prompt"
    assert e.value.message == f"prompt: token id {bad} is outside the vocabulary (size 100)"
