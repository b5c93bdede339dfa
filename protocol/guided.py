"""Output constraints (structured outputs): one kind per request, validated once at the gateway.

The engine compiles each into a grammar (cached by its canonical JSON) and masks the logits with it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.text import Text, encodable_json, text_up_to

MAX_SCHEMA_CHARS = 64_000
MAX_REGEX_CHARS = 4_096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024
MAX_GRAMMAR_CHARS = 64_000
# Checked whole, so that an error's path runs from the schema's root (the gateway's 400 quotes only the message).
EncodableJsonObject = Annotated[dict[str, Any], AfterValidator(encodable_json)]


class GuidedSpec(BaseModel):
    """Exactly one of the fields is set: the shape every generated token must keep."""

    model_config = ConfigDict(extra="forbid")

    json_schema: EncodableJsonObject | None = Field(default=None, description="JSON Schema the output validates "
                                                                             "against")
    json_object: bool = Field(default=False, description="any JSON object")
    regex: text_up_to(MAX_REGEX_CHARS) | None = None
    choice: list[Text] | None = Field(default=None, max_length=MAX_CHOICES)
    grammar: text_up_to(MAX_GRAMMAR_CHARS) | None = Field(default=None, description="EBNF (GBNF) grammar")

    @field_validator("json_schema")
    @classmethod
    def _schema_size(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            size = len(json.dumps(v)) if v is not None else 0
        except RecursionError:  # a value the parser just took can still be too deep to write back deeper in the stack
            raise ValueError("nested too deep to write as JSON") from None
        if size > MAX_SCHEMA_CHARS:
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
