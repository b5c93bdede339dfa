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


class _RecordingPrompts:
    """A prompt builder that says on which thread each prompt was tokenized."""

    vocab_size = 100
    card = SimpleNamespace(max_model_len=1 << 20)

    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode_text(self, text: str) -> list[int]:
        import threading

        self.threads.append(threading.current_thread().name)
        return [1, 2, 3]

    def encode_chat(self, messages, tools=None, **options) -> list[int]:
        return self.encode_text("")


@pytest.mark.parametrize("route", ["completion", "chat"])
async def test_a_large_prompt_is_tokenized_off_the_event_loop_and_a_usual_one_on_it(route):
    """A megabyte of prompt takes the tokenizer a second: on the loop, every other request waited for it."""
    from gateway.prepare import OFF_LOOP_CHARS, prepare
    from gateway.schemas import ChatCompletionRequest, CompletionRequest

    prompts = _RecordingPrompts()

    class Registry:
        async def target(self, model):
            return SimpleNamespace(prompts=prompts, max_model_len=1 << 20, workers=[])

    for text in ("Hello there", "x" * (OFF_LOOP_CHARS + 1)):
        if route == "completion":
            req = CompletionRequest(model="m", prompt=text, max_tokens=4)
        else:
            req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}], max_tokens=4)
        job = await prepare(Registry(), req, "interactive", stream=False)
        assert job.prompt_token_ids == [1, 2, 3]
    assert prompts.threads[0] == "MainThread" and prompts.threads[1] != "MainThread"


async def test_many_small_messages_count_as_a_large_chat():
    from gateway.prepare import OFF_LOOP_CHARS, prepare
    from gateway.schemas import ChatCompletionRequest

    prompts = _RecordingPrompts()

    class Registry:
        async def target(self, model):
            return SimpleNamespace(prompts=prompts, max_model_len=1 << 20, workers=[])

    messages = [{"role": "user", "content": ""}] * (OFF_LOOP_CHARS // 64 + 1)
    await prepare(Registry(), ChatCompletionRequest(model="m", messages=messages, max_tokens=4), "interactive", False)
    assert prompts.threads != ["MainThread"]
