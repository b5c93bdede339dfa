"""Tool calling's request side: `tools`, `tool_choice` and `parallel_tool_calls` checked once, and what
they mean for the job: which tools the chat template shows the model, what the worker parses the output
for, and (for `"required"` or a named function) the JSON schema the output is constrained to, so that
the call always parses and its arguments match the function's parameters (docs/tools.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError
from gateway.schema_rules import Refused, check_schema
from protocol.guided import GuidedSpec
from protocol.text import EncodableJson, Text, text_up_to
from protocol.tools import MAX_TOOLS, ToolParsing

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MAX_DESCRIPTION_CHARS = 8192
MAX_TOOLS_SCHEMA_CHARS = 48_000  # all parameters together, as JSON: their constraint fits GuidedSpec's bound
# A function declared without parameters takes none: its arguments are the empty object.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: text_up_to(MAX_DESCRIPTION_CHARS) | None = None
    parameters: dict[Text, EncodableJson] | None = Field(default=None, description="JSON Schema of the "
                                                                                  "arguments object")
    strict: bool | None = Field(default=None, description="accepted; arguments are constrained to the "
                                                          "schema under tool_choice required or a named one")


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # offered to the chat template, in OpenAI's shape
    parsing: ToolParsing
    guided: GuidedSpec | None  # "required" or a named function


def plan_tools(tools: list[ToolDef] | None, choice: ToolChoice | None, parallel: bool | None,
               chat: bool) -> ToolPlan | None:
    """None when no tools are offered (none given, or tool_choice "none"); 400s name the field."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: requires `tools` (no tools were given)", param="tool_choice")
        return None
    if not chat:
        raise ApiError(400, "tools: only chat requests (`messages`) take tools", param="tools")
    _check_tools(tools)
    if choice == "none":
        return None
    offered = [t.model_dump(exclude_none=True) for t in tools]
    names = [t.function.name for t in tools]
    parallel = parallel is not False
    if choice is None or choice == "auto":
        return ToolPlan(offered, ToolParsing(names=names, form="tagged", parallel=parallel), None)
    if choice == "required":
        schema = calls_schema([t.function for t in tools], many=parallel)
        return ToolPlan(offered, ToolParsing(names=names, form="json", parallel=parallel), _guided(schema))
    named = next((t.function for t in tools if t.function.name == choice.function.name), None)
    if named is None:
        raise ApiError(400, f"tool_choice: function {choice.function.name[:80]!r} is not among `tools` "
                            f"({', '.join(names)[:200]})", param="tool_choice")
    return ToolPlan(offered, ToolParsing(names=[named.name], form="json", parallel=False),
                    _guided(calls_schema([named], many=False)))


def _check_tools(tools: list[ToolDef]) -> None:
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"tools: at most {MAX_TOOLS} tools (got {len(tools)})", param="tools")
    seen: set[str] = set()
    size = 0
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in seen:
            raise ApiError(400, f"tools[{i}].function.name: {fn.name!r} is given twice", param="tools")
        seen.add(fn.name)
        if fn.parameters is not None and fn.parameters.get("type", "object") != "object":
            raise ApiError(400, f"tools[{i}].function.parameters: must be a JSON Schema of an object (type "
                                f"\"object\"; got {str(fn.parameters.get('type'))[:40]!r})", param="tools")
        if fn.parameters is not None:
            try:
                check_schema(fn.parameters)
            except Refused as e:
                raise ApiError(400, f"tools[{i}].function.parameters: {e}", param="tools") from e
        size += len(json.dumps(fn.parameters or {}))
    if size > MAX_TOOLS_SCHEMA_CHARS:
        raise ApiError(400, f"tools: the functions' parameters are at most {MAX_TOOLS_SCHEMA_CHARS} characters "
                            f"of JSON together (got {size})", param="tools")


def _guided(schema: dict[str, Any]) -> GuidedSpec:
    try:
        return GuidedSpec(json_schema=schema)
    except ValidationError as e:
        raise ApiError(400, f"tools: {e.errors()[0]['msg'].removeprefix('Value error, ')}", param="tools") from e


def calls_schema(functions: list[FunctionDef], many: bool) -> dict[str, Any]:
    """The JSON schema of the constrained output: one `{"name", "arguments"}` object (`many`: a non-empty
    array of them), `name` one of the functions and `arguments` valid against that function's parameters.
    Each function's `$defs` move to the root (under the function's name) and its local `$ref`s are
    rewritten to where their targets now are, so a schema keeps resolving once nested."""
    root_defs: dict[str, Any] = {}
    base = "/items" if many else ""
    alternatives = []
    for i, fn in enumerate(functions):
        at = f"{base}/anyOf/{i}" if len(functions) > 1 else base
        arguments = relocate(fn.parameters or NO_PARAMETERS, f"{at}/properties/arguments", f"{fn.name}__", root_defs)
        alternatives.append({"type": "object", "properties": {"name": {"enum": [fn.name]}, "arguments": arguments},
                             "required": ["name", "arguments"], "additionalProperties": False})
    call = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema = {"type": "array", "minItems": 1, "items": call} if many else call
    if root_defs:
        schema = {**schema, "$defs": root_defs}
    return schema


def _pointer_token(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def relocate(schema: dict[str, Any], at: str, prefix: str, root_defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` as placed at JSON pointer `at` of a new root: its `$defs`/`definitions` go into
    `root_defs` as `prefix + name`, every `#...` reference is rewritten to match."""
    moved: dict[str, str] = {}
    for key in ("$defs", "definitions"):
        for name in schema.get(key) or {}:
            new = prefix + name if key == "$defs" else f"{prefix}definitions.{name}"
            moved[f"#/{key}/{_pointer_token(name)}"] = f"#/$defs/{_pointer_token(new)}"

    def ref(target: str) -> str:
        for old, new in moved.items():
            if target == old or target.startswith(old + "/"):
                return new + target[len(old):]
        return "#" + at + target[1:] if target.startswith("#") else target

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ref(v) if k == "$ref" and isinstance(v, str) else fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            root_defs[prefix + name if key == "$defs" else f"{prefix}definitions.{name}"] = fix(sub)
    return fix({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
