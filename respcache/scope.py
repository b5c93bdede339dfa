"""What a cached answer is keyed on. Exact: everything that decides the output (the engine's output version,
model, its card digest, the rendered prompt tokens, every sampling field). Semantic: the same minus the question (the last user
message, or a text prompt), which is embedded instead; the rest (system prompt, earlier messages,
sampling) is the entry's scope and must match exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from protocol.jobs import ChatMessage, JobPayload
from protocol.sampling import OUTPUT_VERSION


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def deterministic(payload: JobPayload) -> bool:
    """Greedy decoding, or sampling with a fixed seed, gives the same answer for the same request."""
    return payload.sampling.greedy or payload.sampling.seed is not None


def exact_id(payload: JobPayload, card_digest: str) -> str:
    parts = [OUTPUT_VERSION, payload.model, card_digest, payload.kind, payload.prompt_token_ids,
             payload.sampling.model_dump(mode="json"), payload.echo_prompt]
    if payload.tools is not None:  # what the output is parsed for (parallel_tool_calls is not in the prompt)
        parts.append(payload.tools.model_dump(mode="json"))
    return "x:" + _digest(parts)


@dataclass(frozen=True)
class SemanticKey:
    scope: str  # digest of everything but the question
    text: str  # the question that is embedded

    @property
    def entry_id(self) -> str:
        return "s:" + _digest([self.scope, self.text])


def semantic_key(payload: JobPayload, card_digest: str, messages: list[ChatMessage] | None,
                 prompt: object, max_tokens_rule: int | str | None,
                 template_options: dict[str, object] | None = None) -> SemanticKey | None:
    """None when the request has no question to embed (no text prompt, or a chat that does not end with a
    user message). `max_tokens_rule` is the max_tokens the client asked for, or the route's default rule
    for it, not the number the job got: a default depends on the prompt's length, which a paraphrase
    changes. `template_options`: a chat's rendering options other than the defaults
    (gateway/schemas.ChatTemplateFields), part of the scope."""
    if payload.echo_prompt is not None:
        return None  # the answer repeats the prompt: a paraphrase's answer would repeat another one
    if template_options and template_options.get("continue_final_message"):
        return None  # the answer continues the final message's very words: a paraphrase's would not fit
    if payload.tools is not None or (messages and any(m.tool_calls or m.role == "tool" for m in messages)):
        return None  # the answer depends on the tools and the calls' results, which the scope does not hold
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # ["x"] asks what "x" asks (a list of several is looked up prompt by prompt)
    if messages is not None:
        last = messages[-1]
        if last.role != "user" or not last.text().strip():
            return None
        context = [[m.role, m.text(), m.name] for m in messages[:-1]]
        text = last.text()
    elif isinstance(prompt, str) and prompt.strip():
        context, text = [], prompt
    else:
        return None
    sampling = payload.sampling.model_dump(mode="json")
    sampling["max_tokens"] = max_tokens_rule
    parts: list[object] = [OUTPUT_VERSION, payload.model, card_digest, payload.kind, context, sampling]
    if template_options:  # a plain chat's scope holds none
        parts.append(template_options)
    return SemanticKey(_digest(parts), text)
