"""Sampling parameters: OpenAI's fields plus vLLM's extensions, validated once at the gateway."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.guided import GuidedSpec
from protocol.numbers import Float, Int
from protocol.text import Text

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256  # per stop string: the detokenizer holds back this much text while it could match
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; the gateway checks against the model's own size
MAX_TOKENS = 1_000_000
MAX_N = 16  # choices (and best_of sequences) of one request: they share the prompt's KV blocks
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_BIAS = 100.0

# What the same request and weights generate: raised whenever the engine's sampling or decoding changes the
# tokens one request produces (2: min_p applied before top-k and top-p, as vLLM v1 applies it). The response
# cache keys on it, so that an upgraded gateway does not replay what an older engine generated.
OUTPUT_VERSION = 2

TokenId = Annotated[Int, Field(ge=0, le=MAX_TOKEN_ID)]
Bias = Annotated[Float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]


class SamplingParams(BaseModel):
    # Infinities and NaN are refused: no bound below holds for them, and a NaN passes comparisons.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # 0 only with prompt_logprobs (completions' echo): the prompt is scored and nothing is generated.
    max_tokens: Int = Field(default=256, ge=0, le=MAX_TOKENS)
    temperature: Float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Int = Field(default=0, ge=0, le=MAX_TOKEN_ID, description="0 or -1 means no top-k cut")
    min_p: Float = Field(default=0.0, ge=0.0, le=1.0)
    seed: Int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # as torch.Generator takes
    stop: list[Text] = Field(default_factory=list)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    min_tokens: Int = Field(default=0, ge=0, le=MAX_TOKENS)
    ignore_eos: bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # Logprobs of the prompt's own tokens (completions' echo): the top-n per position, None for none.
    prompt_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: Float = Field(default=1.0, gt=0.0, le=2.0)
    # Several samples of one prompt (one job): best_of sequences are generated, the n of highest
    # logprob per token returned (best_of None: n and n).
    n: Int = Field(default=1, ge=1, le=MAX_N)
    best_of: Int | None = Field(default=None, ge=1, le=MAX_N)
    # OpenAI's logit_bias: added to these tokens' logits before penalties, temperature and the cuts.
    logit_bias: dict[TokenId, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    include_stop_str_in_output: bool = False  # vLLM's: the matched stop string stays in the text
    # Structured outputs: a grammar every generated token keeps (see protocol/guided.py).
    guided: GuidedSpec | None = None

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (only the penalties do)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_minus_one(cls, v: object) -> object:
        return 0 if v == -1 else v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _no_empty_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        return v or None  # {} biases nothing: one spelling, one response-cache key

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: stop strings are at most {MAX_STOP_CHARS} characters")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens: 0 is allowed only with echo and logprobs (to score the prompt)")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: {self.best_of} must be at least n ({self.n})")
        if self.max_tokens == 0 and self.num_sequences > 1:
            raise ValueError("n: with max_tokens 0 (scoring the prompt) n and best_of must be 1")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def num_sequences(self) -> int:
        """Sequences the engine generates for this request: best_of, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
