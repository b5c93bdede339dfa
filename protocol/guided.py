"""Output constraints (structured outputs): one kind per request, validated once at the gateway.

The engine compiles each into a grammar (cached by its canonical JSON) and masks the logits with it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SCHEMA_CHARS = 64_000
MAX_REGEX_CHARS = 4_096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024
MAX_GRAMMAR_CHARS = 64_000


class GuidedSpec(BaseModel):
    """Exactly one of the fields is set: the shape every generated token must keep."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = Field(default=None, description="JSON Schema the output validates against")
    json_object: bool = Field(default=False, description="any JSON object")
    regex: str | None = Field(default=None, max_length=MAX_REGEX_CHARS)
    choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    grammar: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS, description="EBNF (GBNF) grammar")

    @field_validator("json_schema")
    @classmethod
    def _schema_size(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(json.dumps(v)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"at most {MAX_SCHEMA_CHARS} characters of JSON")
        return v

    @field_validator("choice")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("at least one choice")
        if v is not None and any(not c or len(c) > MAX_CHOICE_CHARS for c in v):
            raise ValueError(f"each choice is 1 to {MAX_CHOICE_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> GuidedSpec:
        kinds = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(f"exactly one of json_schema, json_object, regex, choice, grammar; got {kinds or 'none'}")
        return self

    def cache_key(self) -> str:
        """Canonical JSON: equal constraints compile once."""
        return json.dumps(self.model_dump(exclude_defaults=True), sort_keys=True, separators=(",", ":"))
