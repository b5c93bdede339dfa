"""Chat prompts rendered and tokenized by the gateway equal transformers' apply_chat_template.

transformers is imported here, in the test only; the gateway itself must never import it (or torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.prompts import CannotContinue, PromptBuilder, TemplateRaised
from protocol.jobs import ChatMessage
from protocol.workers import ModelCard

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke about  spaces\tand\nnewlines."}],
    [{"role": "system", "content": "Réponds en français. 日本語も OK 🙂"},
     {"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"},
     {"role": "user", "content": "<|im_start|> is a special token"}],
]


def card_for(model_dir: Path) -> ModelCard:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return ModelCard(name="m", max_model_len=2048, tokenizer_json=(model_dir / "tokenizer.json").read_text(),
                     chat_template=(model_dir / "chat_template.jinja").read_text(),
                     bos_token=config.get("bos_token"), eos_token=config.get("eos_token"))


@pytest.fixture(scope="module")
def builder(default_model_dir) -> PromptBuilder:
    return PromptBuilder(card_for(Path(default_model_dir)))


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_tokens_match_transformers(builder, hf_tokenizer, messages):
    ours = builder.encode_chat([ChatMessage(**m) for m in messages])
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(theirs, dict) or hasattr(theirs, "input_ids"):  # newer transformers return a BatchEncoding
        theirs = theirs["input_ids"]
    assert ours == list(theirs)
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert builder.render_chat([ChatMessage(**m) for m in messages]) == text


def test_plain_prompt_tokens_match_transformers(builder, hf_tokenizer):
    for text in ["Once upon a time", " leading space", "emoji 🙂 and tabs\t"]:
        assert builder.encode_text(text) == hf_tokenizer(text)["input_ids"]


def test_template_helpers(default_model_dir):
    card = card_for(Path(default_model_dir))
    card.chat_template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ bos_token }}{{ messages[0] | tojson }}\n  {% if add_generation_prompt %}{{ strftime_now('%Y') }}{% endif %}"
    )
    b = PromptBuilder(card)
    out = b.render_chat([ChatMessage(role="user", content="é")])
    assert out.startswith('<|im_start|>{"role": "user", "content": "é"}')  # tojson keeps non-ASCII
    assert out.endswith(str(__import__("datetime").date.today().year))
    with pytest.raises(TemplateRaised, match="one message only"):
        b.render_chat([ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")])


def test_sandbox_refuses_unsafe_templates(default_model_dir):
    card = card_for(Path(default_model_dir))
    card.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TemplateRaised):
        PromptBuilder(card).render_chat([ChatMessage(role="user", content="x")])


def test_gateway_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); import gateway.app, gateway.server; "
            "print(time.perf_counter() - t); "
            "bad = [m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 5.0  # generous: shared CI boxes are slow; typically ~0.5-1 s


PREFILLED = [
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}],
    [{"role": "user", "content": "Write a list."}, {"role": "assistant", "content": "1. apples\n2. "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "  Hello"}],
    # Prefills that the template's own text after them also holds ("<|im_end|>"): the cut is still theirs.
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "end"}],
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "im"}],
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "|>"}],
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "Hello "}],
]


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):  # newer transformers: a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


@pytest.mark.parametrize("messages", PREFILLED)
def test_continue_final_message_matches_transformers(builder, hf_tokenizer, messages):
    """vLLM's continue_final_message: the prompt ends inside the final message, which the model continues."""
    chat = [ChatMessage(**m) for m in messages]
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                              tokenize=False)
    assert builder.render_chat(chat, add_generation_prompt=False, continue_final_message=True) == theirs
    assert not theirs.endswith("<|im_end|>\n")
    ids = builder.encode_chat(chat, add_generation_prompt=False, continue_final_message=True)
    assert ids == _ids(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                        continue_final_message=True, tokenize=True))


def test_no_generation_prompt_matches_transformers(builder, hf_tokenizer):
    messages = CONVERSATIONS[1]
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert builder.render_chat([ChatMessage(**m) for m in messages], add_generation_prompt=False) == theirs
    assert not theirs.endswith("<|im_start|>assistant\n")


def test_chat_template_kwargs_reach_the_template(default_model_dir):
    card = card_for(Path(default_model_dir)).model_copy(update={
        "chat_template": "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    builder = PromptBuilder(card)
    chat = [ChatMessage(role="user", content="hi")]
    assert builder.render_chat(chat) == "hi"
    assert builder.render_chat(chat, chat_template_kwargs={"enable_thinking": False}) == "/no_think hi"


def test_a_final_message_the_template_does_not_show_cannot_be_continued(default_model_dir):
    card = card_for(Path(default_model_dir)).model_copy(update={
        "chat_template": "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"})
    chat = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="well")]
    with pytest.raises(CannotContinue, match="continue_final_message"):
        PromptBuilder(card).render_chat(chat, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(CannotContinue, match="no text"):
        PromptBuilder(card).render_chat([ChatMessage(role="assistant", content=" ")], add_generation_prompt=False,
                                        continue_final_message=True)


def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(builder):
    parts = ChatMessage(role="user", content=[{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}])
    assert parts.text() == "Hello\nWorld"
    joined = ChatMessage(role="user", content="Hello\nWorld")
    assert builder.encode_chat([parts]) == builder.encode_chat([joined])
