"""Turns a validated request body into a JobPayload: render, tokenize, check the context, map sampling.
Everything that can make a request invalid is found here, before anything is enqueued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

from gateway.errors import ApiError
from gateway.guided import requested_guided, wants_guided
from gateway.options import check_webhook, parse_deadline
from gateway.prompts import CannotContinue, TemplateRaised
from gateway.registry import Registry
from gateway.sampling import check_streaming, requested_logprobs, to_sampling
from gateway.schemas import ChatCompletionRequest, ChatTemplateFields, CompletionRequest, JobCreate
from gateway.tools import ToolPlan, plan_tools
from gateway.unsupported import check_unsupported
from protocol.jobs import ChatMessage, JobKind, JobPayload, Lane, new_job_id
from protocol.sampling import SamplingParams

UNKNOWN_CONTEXT = 1 << 62  # a model's context where no model is asked yet: no prompt is too long for it
# Prompts larger than this (characters, and a chat's messages counted at 64 each for the template's text around
# them) are rendered and tokenized off the event loop.
OFF_LOOP_CHARS = 16_384


def check_model_free(req: ChatCompletionRequest | CompletionRequest | JobCreate) -> None:
    """The rules a request obeys whatever model serves it: sampling ranges, stop strings, tools, output
    constraints, deadline, webhook. A batch upload checks each line with them, before any model is asked;
    `prepare` checks them again with the model's context and vocabulary."""
    _delivery(req)
    chat = getattr(req, "messages", None) is not None
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, chat=chat)
    if not chat:
        _check_no_template(req)
    echoed = not chat and getattr(req, "echo", False)
    guided = requested_guided(req) if wants_guided(req) else None
    sampling = to_sampling(req, 1, UNKNOWN_CONTEXT, "messages" if chat else "prompt", None,
                           requested_logprobs(req) if echoed else None, guided)
    _with_tools(sampling, tools)


def _delivery(req: ChatCompletionRequest | CompletionRequest | JobCreate) -> tuple[float | None, str | None]:
    """The fields no model needs checked first (one not implemented is refused before any other rule), and
    the job's deadline and webhook URL from them."""
    check_unsupported(req)
    return parse_deadline(req.deadline, req.ttl, time.time()), check_webhook(getattr(req, "webhook_url", None))


async def prepare(registry: Registry, req: ChatCompletionRequest | CompletionRequest | JobCreate,
                  lane: Lane, stream: bool, tenant: str = "default") -> JobPayload:
    deadline, webhook_url = _delivery(req)
    target = await registry.target(req.model)
    prompts = target.prompts
    messages: list[ChatMessage] | None = getattr(req, "messages", None)
    plan = partial(plan_tools, req.tools, req.tool_choice, req.parallel_tool_calls, messages is not None)
    tools = await asyncio.to_thread(plan) if req.tools else plan()  # functions' schemas are checked off the loop
    echo_prompt = None
    prompt_logprobs = None
    template = req.template_options() if isinstance(req, ChatTemplateFields) else {}
    kind: JobKind
    if messages is not None:
        kind, field = "chat", "messages"
        encode = partial(prompts.encode_chat, messages, tools.tools if tools else None, **template)
        try:
            ids = await tokenized(encode, sum(len(m.text()) + 64 for m in messages))
        except CannotContinue as e:
            raise ApiError(400, str(e), param="continue_final_message") from e
        except TemplateRaised as e:
            raise ApiError(400, f"messages: {e}", param="messages") from e
    else:
        kind, field = "completion", "prompt"
        _check_no_template(req)
        text, ids = _completion_prompt(req.prompt, prompts)
        if text is not None:
            ids = await tokenized(partial(prompts.encode_text, text), len(text))
        if getattr(req, "echo", False):
            echo_prompt = text if text is not None else prompts.decode(ids)
            prompt_logprobs = requested_logprobs(req)  # echoed tokens carry logprobs as the output does
    if not ids:
        raise ApiError(400, f"{field}: the prompt is empty", param=field)
    # Schema checks may take a while on a large schema: off the event loop.
    guided = await asyncio.to_thread(requested_guided, req) if wants_guided(req) else None
    sampling = to_sampling(req, len(ids), target.max_model_len, field, prompts.vocab_size, prompt_logprobs,
                           guided)
    check_streaming(sampling, stream)
    sampling = _with_tools(sampling, tools)
    return JobPayload(id=new_job_id(req.model), model=req.model, kind=kind, lane=lane, prompt_token_ids=ids,
                      sampling=sampling, stream=stream, tenant=tenant, echo_prompt=echo_prompt,
                      deadline=deadline, webhook_url=webhook_url, run_to_completion=req.run_to_completion,
                      tools=tools.parsing if tools else None)


async def tokenized(encode: Callable[[], list[int]], size: int) -> list[int]:
    """encode() on the event loop for a usual prompt, in a thread for a large one, whose rendering and
    tokenization every other request to this gateway would otherwise wait for (the tokenizer lets go of the
    interpreter lock while it works). A thread's hand-off costs more than a usual
    prompt's tokenization, which lies on every request's time to first token."""
    return await asyncio.to_thread(encode) if size > OFF_LOOP_CHARS else encode()


def _check_no_template(req: ChatCompletionRequest | CompletionRequest | JobCreate) -> None:
    """A prompt is not rendered by a chat template: its options are refused, not ignored."""
    template = req.template_options() if isinstance(req, ChatTemplateFields) else {}
    if template:
        name = next(iter(template))
        raise ApiError(400, f"{name}: a chat template option; a prompt is not rendered by a template",
                       param=name)


def _with_tools(sampling: SamplingParams, tools: ToolPlan | None) -> SamplingParams:
    """The sampling with the constraint that a required tool call puts on the output."""
    if tools is None or tools.guided is None:
        return sampling
    if sampling.guided is not None:
        raise ApiError(400, 'tool_choice: "required" or a named function constrains the output to the '
                            "call; it cannot be combined with response_format or guided decoding",
                       param="tool_choice")
    return sampling.model_copy(update={"guided": tools.guided})


def _completion_prompt(prompt, prompts) -> tuple[str | None, list[int]]:
    """(prompt text, []) for a text, (None, its ids) for token ids; one prompt per job (gateway/prompt_list.py
    splits a completion of several)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: a job takes one prompt (got {len(prompt)}); /v1/completions "
                                "takes several", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, []
    bad = next((t for t in prompt if not 0 <= t < prompts.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (size {prompts.vocab_size})",
                       param="prompt")
    return None, list(prompt)
