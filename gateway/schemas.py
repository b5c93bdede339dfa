"""Request bodies the gateway accepts: OpenAI's chat and completion requests (plus vLLM's sampling
extensions) and tokenq's job request. Bounds live in `protocol.sampling.SamplingParams`; these models only
check shapes, and `sampling.py` maps them onto SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.schema_rules import Refused, check_depth
from gateway.tools import ToolChoice, ToolDef
from protocol.guided import GuidedSpec
from protocol.jobs import UNSUPPORTED, ChatMessage, Lane
from protocol.numbers import Float, Int, Number
from protocol.text import EncodableJson, Text, text_up_to
from protocol.tools import MAX_TOOLS
from respcache.policy import CacheOption

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_WEBHOOK_URL_CHARS = 2048
MAX_USER_CHARS = 256
MAX_MODEL_CHARS = 256

Prompt = Text | list[Int] | list[Text] | list[list[Int]]


def _metadata_limits(v: dict[str, str]) -> dict[str, str]:
    if len(v) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys, got {len(v)}")
    for key, value in v.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"keys are at most {MAX_METADATA_KEY_CHARS} characters: {key[:80]!r}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"values are at most {MAX_METADATA_VALUE_CHARS} characters (key {key!r})")
    return v


# A job's or a batch's `metadata`: string keys and values, bounded, valid Unicode (stored, and echoed back).
Metadata = Annotated[dict[Text, Text], AfterValidator(_metadata_limits)]


class NullMeansDefault(BaseModel):
    """An explicit null is the field's default, as OpenAI reads one ("boolean or null"): clients that write
    every field out, nulls included, send `"stream": null`."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required()
                            and fields[k].get_default(call_default_factory=True) is not None)}
        return data


class StreamOptions(NullMeansDefault):
    """OpenAI's stream options; another key is refused, not ignored (a client would wait for its effect)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's: tokenq's chunks carry no obfuscation padding either way
    continuous_usage_stats: bool = False  # vLLM's usage on every chunk: refused when set

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_per_chunk_usage(cls, v: bool) -> bool:
        if v:
            raise PydanticCustomError(UNSUPPORTED, "usage on every chunk is not served; include_usage gives it in "
                                                   "a last chunk")
        return v


class SamplingFields(NullMeansDefault):
    """OpenAI's sampling fields and vLLM's extensions; None means "not given". OpenAI's fields that tokenq
    does not implement are declared too, so that gateway/unsupported.py can refuse them when set."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int | None = Field(default=None, description="choices: 1 to 16")
    stop: Text | list[Text] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    user: text_up_to(MAX_USER_CHARS) | None = None
    # vLLM extensions
    top_k: Int | None = None
    min_p: Float | None = None
    min_tokens: Int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int] | None = None
    repetition_penalty: Float | None = None
    include_stop_str_in_output: bool | None = None
    best_of: Int | None = Field(default=None, description="sequences generated, the n of highest logprob per "
                                                          "token returned: n to 16 (completions only)")
    logit_bias: dict[Text, EncodableJson] | None = Field(default=None, description="token id -> bias in "
                                                                                  "[-100, 100], at most 300")
    # Structured outputs: at most one of these (mapped by gateway/guided.py).
    response_format: EncodableJson = Field(default=None, description='{"type": "text" | "json_object" | '
                                                                     '"json_schema", "json_schema": {"name", '
                                                                     '"schema", "strict"}}')
    guided_json: EncodableJson = Field(default=None, description="vLLM: a JSON Schema (object or JSON text)")
    guided_regex: Text | None = Field(default=None, description="vLLM: a regular expression")
    guided_choice: list[Text] | None = Field(default=None, description="vLLM: one of these strings")
    guided_grammar: Text | None = Field(default=None, description="vLLM: an EBNF (GBNF) grammar")
    structured_outputs: EncodableJson = Field(default=None, description="vLLM: {json | regex | choice | "
                                                                        "grammar | json_object}")
    # Tool calling (chat only; checked by gateway/tools.py).
    tools: list[ToolDef] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(default=None, description='"none", "auto" (the default with tools), '
                                                                     '"required" or {"type": "function", '
                                                                     '"function": {"name": ...}}')
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call (default true)")
    # Not implemented: refused unless absent, null or their default (see gateway/unsupported.py), so never
    # stored: no rule on their strings.
    functions: list[Any] | None = Field(default=None, description="deprecated: use tools; refused unless empty")
    function_call: Any = Field(default=None, description='deprecated: use tool_choice; only "none" or "auto"')
    suffix: Any = Field(default=None, description="not supported: refused unless empty")
    modalities: list[Any] | None = Field(default=None, description='not supported: only ["text"]')
    audio: Any = Field(default=None, description="not supported: refused unless null")
    prediction: Any = Field(default=None, description="not supported: refused unless null")
    use_beam_search: Any = Field(default=None, description="not supported: refused unless false")
    # vLLM's, which change the prompt or the output: refused unless absent, null or their default.
    chat_template: Any = Field(default=None, description="not supported: the model's own template renders")
    truncate_prompt_tokens: Any = Field(default=None, description="not supported: refused unless null")
    echo: Any = Field(default=None, description="completions only (a chat's echo is not supported)")
    allowed_token_ids: Any = Field(default=None, description="not supported: refused unless null")
    bad_words: Any = Field(default=None, description="not supported: refused unless empty")
    documents: Any = Field(default=None, description="not supported: refused unless empty")
    prompt_logprobs: Any = Field(default=None, description="not supported: use echo with logprobs (completions)")
    return_tokens_as_token_ids: Any = Field(default=None, description="not supported: refused unless false")
    skip_special_tokens: Any = Field(default=None, description="not supported: special tokens are always "
                                                               "skipped (refused unless true)")
    spaces_between_special_tokens: Any = Field(default=None, description="not supported: refused unless true")


class JobOptions(NullMeansDefault):
    """tokenq's extensions on every submitting route (checked by gateway/options.py)."""

    deadline: Number | Text | None = Field(default=None, description="epoch seconds or RFC 3339")
    ttl: Number | None = Field(default=None, description="seconds from now; the job's deadline")
    run_to_completion: bool = Field(default=False, description="a client that disconnects before "
                                                               "the end does not cancel the job")
    cache: CacheOption | None = Field(default=None, description="response cache: mode exact, semantic or off "
                                                                "(default: the tenant's), threshold")


# Names the renderer gives the chat template itself; chat_template_kwargs may not replace them.
TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                               "continue_final_message"})
MAX_TEMPLATE_KWARGS = 32


class ChatTemplateFields(NullMeansDefault):
    """vLLM's chat-template extensions (chats only): the assistant turn the prompt opens, a final message
    the model continues (a prefilled answer), and variables for the template (`enable_thinking`...)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[Text, EncodableJson] | None = None

    @model_validator(mode="after")
    def _template_options(self) -> ChatTemplateFields:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message: continuing the final message opens no new turn; set "
                             "add_generation_prompt to false with it")
        kwargs = self.chat_template_kwargs or {}
        if len(kwargs) > MAX_TEMPLATE_KWARGS:
            raise ValueError(f"chat_template_kwargs: at most {MAX_TEMPLATE_KWARGS} variables, got {len(kwargs)}")
        reserved = sorted(TEMPLATE_RESERVED & kwargs.keys())
        if reserved:
            raise ValueError(f"chat_template_kwargs.{reserved[0]}: set by the request itself, not as a "
                             "template variable")
        try:
            check_depth(kwargs)
        except Refused as e:
            raise ValueError(f"chat_template_kwargs: {e}") from None
        return self

    def template_options(self) -> dict[str, Any]:
        """The options that differ from a plain chat's (empty for one), by field name, as render_chat takes them."""
        options: dict[str, Any] = {}
        if not self.add_generation_prompt:
            options["add_generation_prompt"] = False
        if self.continue_final_message:
            options["continue_final_message"] = True
        if self.chat_template_kwargs:
            options["chat_template_kwargs"] = self.chat_template_kwargs
        return options


class ChatCompletionRequest(SamplingFields, JobOptions, ChatTemplateFields):
    model: text_up_to(MAX_MODEL_CHARS)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: Lane = "interactive"


class CompletionRequest(SamplingFields, JobOptions, ChatTemplateFields):
    """The template fields are declared so that a prompt refuses them (gateway/prepare._check_no_template)."""

    model: text_up_to(MAX_MODEL_CHARS)
    prompt: Prompt
    # Chat's newer name for max_tokens, taken here too (and winning, as there): OpenAI's legacy route would
    # refuse it, and ignoring it would cut the answer at the default 16 tokens without a word.
    max_completion_tokens: Int | None = None
    logprobs: Int | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: Lane = "interactive"


class JobCreate(SamplingFields, JobOptions, ChatTemplateFields):
    """POST /v1/jobs: a chat (`messages`) or a completion (`prompt`), queued on a lane. tokenq's own API:
    a field it does not know is refused (a misspelt `webhook_url` would otherwise be lost)."""

    model_config = ConfigDict(extra="forbid")

    model: text_up_to(MAX_MODEL_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: Prompt | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool | Int | None = None
    top_logprobs: Int | None = None
    echo: bool = False
    priority: Lane = "default"
    metadata: Metadata = Field(default_factory=dict)
    stream: bool = False
    webhook_url: text_up_to(MAX_WEBHOOK_URL_CHARS) | None = None
    guided: GuidedSpec | None = Field(default=None, description="the output constraint as the engine takes it "
                                                                "(instead of response_format or guided_*)")

    @model_validator(mode="after")
    def _one_prompt(self) -> JobCreate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("messages: give exactly one of `messages` (chat) or `prompt` (completion)")
        return self


def dump_request(body: BaseModel, exclude: frozenset[str] | None = None) -> str:
    """The client's body as stored in the job hash (JSON): only the fields it set. pydantic's own encoder
    writes it in one pass, where model_dump and then json.dumps walked a long prompt twice."""
    return body.model_dump_json(exclude_unset=True, exclude=exclude)
