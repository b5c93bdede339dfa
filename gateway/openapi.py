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
}


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
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            had_input = responses.pop("422", None) is not None
            if had_input:
                responses["400"] = _error(_ERRORS["400"])
            if authenticated:
                responses["401"] = _error(_ERRORS["401"])
                operation["security"] = [{SCHEME: []}]
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
