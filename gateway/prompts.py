"""Chat templates and tokenization, done at the gateway from a worker's model card (no model files here).

The Jinja environment is set up the way transformers' `apply_chat_template` sets up its own, so that a
prompt rendered here tokenizes to the same ids as there."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gateway.tool_prompt import fallback_messages, native_message
from protocol.jobs import ChatMessage
from protocol.workers import ModelCard


class TemplateRaised(ValueError):
    """The chat template called raise_exception (for example: roles must alternate)."""


class CannotContinue(TemplateRaised):
    """continue_final_message asked of a chat whose final message the rendered prompt does not end with."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


# Marks where the final message's content ends, as transformers marks it for continue_final_message: the cut
# falls at the mark, not at the content's last occurrence, which can lie in the template's own text after it
# (a prefill "end" inside "<|im_end|>").
_CONTINUE_MARK = "CONTINUE_FINAL_MESSAGE_TAG "


def _marked_final(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The chat with _CONTINUE_MARK after the final message's content."""
    final = messages[-1]
    if not final.text().strip():
        raise CannotContinue("continue_final_message: the final message has no text to continue")
    return [*messages[:-1], final.model_copy(update={"content": final.text() + _CONTINUE_MARK})]


def _open_final_message(text: str, final: str) -> str:
    """The rendered chat (of _marked_final's messages) cut where the final message's content ends, keeping its
    trailing spaces where the template kept them, as transformers' apply_chat_template cuts it."""
    mark = _CONTINUE_MARK.strip()
    if final.strip() not in text or mark not in text:
        raise CannotContinue("continue_final_message: the chat template does not show the final message's text "
                             "as written, so there is no place to continue it from")
    at = text.rindex(mark)
    return text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()


class PromptBuilder:
    """Renders and counts prompts for one model card; built once per card and cached by the registry."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.tokenizer = Tokenizer.from_str(card.tokenizer_json)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.template = _ENV.from_string(card.chat_template) if card.chat_template else None
        # A template that reads `tools` renders tools and tool messages itself; others get gateway/tool_prompt's
        # fallback format.
        self.native_tools = bool(card.chat_template) and "tools" in meta.find_undeclared_variables(
            _ENV.parse(card.chat_template))
        self.bos_id = self.tokenizer.token_to_id(card.bos_token) if card.bos_token else None

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text; `tools` (OpenAI's shape) are offered to the model. With `continue_final_message`
        the text ends where the final message's content does (no end-of-turn), so the model continues it;
        `chat_template_kwargs` are more variables for the template."""
        if self.template is None:
            raise TemplateRaised(f"model {self.card.name} has no chat template; use /v1/completions")
        extra: dict[str, Any] = dict(chat_template_kwargs or {})
        final = messages[-1].text() if continue_final_message else ""
        if continue_final_message:
            messages = _marked_final(messages)
        if self.native_tools:
            dicts = [native_message(m) for m in messages]
            if tools:
                extra["tools"] = tools
        else:
            dicts = fallback_messages(messages, tools)
        try:
            text = self.template.render(messages=dicts, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.card.bos_token or "",
                                        eos_token=self.card.eos_token or "", **extra)
        except TemplateRaised:
            raise
        except TemplateError as e:
            raise TemplateRaised(f"chat template failed: {e}") from e
        return _open_final_message(text, final) if continue_final_message else text

    def encode_chat(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    **options: Any) -> list[int]:
        """The prompt's ids; `options` are render_chat's (ChatTemplateFields.template_options)."""
        # The template writes any BOS itself, so no special tokens are added (as transformers does).
        text = self.render_chat(messages, tools=tools, **options)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if self.card.add_bos_token and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

