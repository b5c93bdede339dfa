"""/openapi.json as the API answers: bad input is a 400 in OpenAI's error JSON (FastAPI's default schema
says 422 with its own body), and the /v1 routes take a bearer API key."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from protocol.errors import ErrorResponse

SCHEME = "bearerAuth"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERRORS = {
    "400": "Invalid request: the error names the field (`param`) and the limit it broke",
    "401": "Missing or unknown API key (when keys are configured)",
    "404": "No such object (another tenant's ids are not confirmed to exist), or no such model",
    "409": "The Idempotency-Key is bound to a request that is gone or still being written: retry",
    "429": "A tenant limit (rpm, tpm, max_queued) or a full lane: `Retry-After` says when to retry",
}
_SUBMITTING = ("/v1/jobs", "/v1/chat/completions", "/v1/completions")


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    components["securitySchemes"] = {SCHEME: {"type": "http", "scheme": "bearer",
                                              "description": "an API key made with `tokenq keys create`"}}
    for path, operations in spec.get("paths", {}).items():
        authenticated = path.startswith("/v1/")
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            had_input = responses.pop("422", None) is not None
            if had_input:
                responses["400"] = _error(_ERRORS["400"])
            if authenticated:
                responses["401"] = _error(_ERRORS["401"])
                operation["security"] = [{SCHEME: []}]
                submitting = method == "post" and path in _SUBMITTING
                if "{" in path or submitting:
                    responses["404"] = _error(_ERRORS["404"])
                if submitting:
                    responses["409"] = _error(_ERRORS["409"])
                    responses["429"] = _error(_ERRORS["429"])
            else:
                operation["security"] = []
    return spec


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi` (built once, on first request) as the app's schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
