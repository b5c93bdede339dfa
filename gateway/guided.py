"""From a request's structured-output fields to one GuidedSpec: OpenAI's `response_format`, vLLM's
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`, and tokenq's own
`guided` on /v1/jobs. At most one of them per request; errors name the client's field.

Schemas and regexes are checked here (gateway/schema_rules.py: valid, and only rules the grammar engine
enforces), so that a bad one is a 400 before anything is queued. The engine compiles the grammar itself; a
constraint it cannot compile all the same (an EBNF grammar is checked there only) fails its job alone, as a
400 `invalid_request_error`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gateway.errors import ApiError
from gateway.schema_rules import Refused, check_regex, check_schema
from gateway.schemas import SamplingFields
from protocol.guided import GuidedSpec
from protocol.json_text import parse_json

_VLLM_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}
# vLLM's StructuredOutputsParams keys that map onto a GuidedSpec field; its other keys are refused.
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                       "json_object": "json_object"}


def wants_guided(req: SamplingFields) -> bool:
    """Whether the request sets any structured-output field (the rest skip the checks entirely)."""
    return any(getattr(req, name, None) is not None
               for name in ("response_format", "structured_outputs", "guided", *_VLLM_FIELDS))


def requested_guided(req: SamplingFields) -> GuidedSpec | None:
    """The one output constraint the request asks for, checked; None for plain text. Runs schema and
    regex checks, so the gateway calls it off the event loop."""
    found: list[tuple[str, dict[str, Any]]] = []  # (the client's field, GuidedSpec fields)
    rf = _response_format(req.response_format)
    if rf is not None:
        found.append(("response_format", rf))
    for name, kind in _VLLM_FIELDS.items():
        value = getattr(req, name, None)
        if value is not None:
            found.append((name, {kind: _schema_value(value, name) if kind == "json_schema" else value}))
    so = _structured_outputs(req.structured_outputs)
    if so is not None:
        found.append(("structured_outputs", so))
    own = getattr(req, "guided", None)
    if own is not None:
        found.append(("guided", own.model_dump(exclude_defaults=True)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ApiError(400, f"{names}: give at most one output constraint (response_format, guided_json, "
                            "guided_regex, guided_choice, guided_grammar or structured_outputs)",
                       param=found[1][0])
    field, values = found[0]
    try:
        spec = GuidedSpec.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        where = _user_key(field, err["loc"])
        raise ApiError(400, f"{field}{'.' + where if where else ''}: {err['msg'].removeprefix('Value error, ')}",
                       param=field) from e
    _check(spec, field)
    return spec


def _user_key(field: str, loc: tuple) -> str:
    """The key inside `field` that an error is about, as the client spelled it: `structured_outputs.json`,
    `guided.choice`; none for a field that is the constraint itself (`guided_choice`, `response_format`)."""
    if not loc or field not in ("structured_outputs", "guided"):
        return ""
    key = str(loc[0])
    if field == "structured_outputs":
        key = next((theirs for theirs, ours in _STRUCTURED_OUTPUTS.items() if ours == key), key)
    return ".".join([key, *map(str, loc[1:])])


def _response_format(rf: Any) -> dict[str, Any] | None:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ApiError(400, "response_format.json_schema: an object with `name` and `schema` is required",
                           param="response_format")
        schema = js.get("schema")
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return {"json_object": True}
        return {"json_schema": _schema_value(schema, "response_format.json_schema.schema")}
    raise ApiError(400, f'response_format.type: one of "text", "json_object", "json_schema" (got {kind!r})',
                   param="response_format")


def _structured_outputs(so: Any) -> dict[str, Any] | None:
    if so is None:
        return None
    if not isinstance(so, dict):
        raise ApiError(400, "structured_outputs: an object", param="structured_outputs")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(_STRUCTURED_OUTPUTS))
    if unknown:
        raise ApiError(400, f"structured_outputs: {', '.join(unknown)} not supported (supported: "
                            f"{', '.join(_STRUCTURED_OUTPUTS)})", param="structured_outputs")
    out = {_STRUCTURED_OUTPUTS[k]: v for k, v in given.items()}
    if "json_schema" in out:
        out["json_schema"] = _schema_value(out["json_schema"], "structured_outputs.json")
    return out


def _schema_value(value: Any, field: str) -> Any:
    """vLLM accepts a schema as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except ValueError as e:
            raise ApiError(400, f"{field}: not valid JSON: {e}", param=field.split(".")[0]) from e
    if not isinstance(value, dict):
        raise ApiError(400, f"{field}: a JSON Schema is an object (got {type(value).__name__})",
                       param=field.split(".")[0])
    return value


def _check(spec: GuidedSpec, field: str) -> None:
    try:
        if spec.json_schema is not None:
            check_schema(spec.json_schema)
        if spec.regex is not None:
            check_regex(spec.regex)
    except Refused as e:
        raise ApiError(400, f"{field}: {e}", param=field) from e
